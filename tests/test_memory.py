"""Per-user memory: isolation (randomized, threads, processes, the server with two API keys), dedup and
contradiction, ranking, windowing, erasure from the file, export, the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest
from test_cli import slm

from slmforge.errors import ConfigError
from slmforge.generate import Completion
from slmforge.memory import MemoryStore, Scope, context_for, remember_conversation, rule_facts, window
from slmforge.rag import HashingEmbedder

from conftest import LiveServer


@pytest.fixture
def store(tmp_path: Path) -> MemoryStore:
    return MemoryStore(tmp_path / "m.sqlite", HashingEmbedder(128))


def test_rules_find_facts_with_subjects():
    facts = rule_facts("My name is Alice Smith. I prefer tabs over spaces, and my favorite color is blue. I live in Paris.")
    assert [(f["kind"], f["subject"]) for f in facts] == [
        ("fact", "name"), ("preference", "favorite color"), ("fact", "home"), ("preference", None)]
    assert facts[0]["text"] == "The user's name is Alice Smith."


def test_a_restatement_merges_and_a_contradiction_replaces(store):
    alice = Scope.user("alice")
    first = store.remember(alice, "The user's favorite color is blue.", "preference", 0.5, "favorite color")
    assert store.remember(alice, "The user's favorite color is blue.", "preference", 0.8, "favorite color") == first
    newer = store.remember(alice, "The user's favorite color is green.", "preference", 0.7, "favorite color")
    assert [m.text for m in store.list(alice)] == ["The user's favorite color is green."]
    old = next(m for m in store.list(alice, history=True) if m.id == first)
    assert old.superseded_by == newer and old.importance == 0.8


class FactModel:
    """A model whose extraction names what each fact is about."""

    def __init__(self, facts: list[dict]) -> None:
        self.facts = facts

    def chat(self, messages, params):
        return [Completion(json.dumps(self.facts), 10, "stop")]


def test_model_facts_carry_a_subject_so_a_newer_one_supersedes(store):
    """Facts the rules cannot read (no "my X is") come from the model with a subject; a later one about the
    same subject replaces the earlier, as rule facts do."""
    ivy = Scope.user("ivy")
    said = [{"role": "user", "content": "Around here we all drive to work; for me it is a blue bicycle."}]
    remember_conversation(store, ivy, said, FactModel([{"text": "The user commutes by blue bicycle.",
                                                        "kind": "fact", "subject": "Commute"}]))
    remember_conversation(store, ivy, said, FactModel([{"text": "The user commutes by tram.", "kind": "fact",
                                                        "subject": "commute "}]))
    assert [m.text for m in store.list(ivy)] == ["The user commutes by tram."]
    assert len(store.list(ivy, history=True)) == 2


def test_recall_ranks_by_relevance_recency_and_importance(store):
    bob = Scope.user("bob")
    store.remember(bob, "The user deploys with docker compose.", "fact", 0.9)
    store.remember(bob, "The user deploys with docker compose on fridays.", "fact", 0.2)
    store.remember(bob, "The user likes green tea.", "preference", 0.9)
    query = "how does the user deploy with docker"
    top = store.recall(bob, query, k=3)
    assert top[0].text == "The user deploys with docker compose."
    emb = store.embedder
    for m in top:  # relevance x importance (recency 1: just written)
        relevance = max(0.0, float(emb.embed([m.text])[0] @ emb.embed([query])[0]))
        assert m.score == pytest.approx(relevance * m.importance, rel=1e-3)
    later = store.recall(bob, "how does the user deploy with docker", k=3, now=top[0].updated + 90 * 86400)
    assert later[0].score == pytest.approx(top[0].score / 8, rel=1e-3)  # three half-lives of 30 days


def test_recalling_a_memory_keeps_it_fresh(store, tmp_path: Path):
    """Recency counts from the last update or recall: a memory recalled 60 days in has decayed for 30 days at
    day 90, one never recalled for 90."""
    cy = Scope.user("cy")
    used = store.remember(cy, "The user's laptop runs Debian.", "fact", 0.5, "laptop")
    idle = store.remember(cy, "The user's phone runs Android.", "fact", 0.5, "phone")
    t0 = next(m for m in store.list(cy) if m.id == used).updated
    assert store.recall(cy, "laptop operating system", 1, now=t0 + 60 * 86400)[0].id == used
    emb, query = store.embedder, "what the user's devices run"
    day90 = {m.id: m for m in store.recall(cy, query, 2, now=t0 + 90 * 86400)}
    for mid, text, half_lives in ((used, "The user's laptop runs Debian.", 1), (idle, "The user's phone runs Android.", 3)):
        relevance = max(0.0, float(emb.embed([text])[0] @ emb.embed([query])[0]))
        assert relevance > 0 and day90[mid].score == pytest.approx(relevance * 0.5 * 0.5**half_lives, rel=1e-3)
        assert day90[mid].used == pytest.approx(t0 + 90 * 86400)  # both recalled now


def test_a_file_from_before_the_used_column_opens(tmp_path: Path):
    import sqlite3

    with sqlite3.connect(tmp_path / "old.sqlite") as db:
        db.executescript("""CREATE TABLE memories (
            id INTEGER PRIMARY KEY AUTOINCREMENT, scope TEXT NOT NULL, owner TEXT NOT NULL, kind TEXT NOT NULL,
            subject TEXT, text TEXT NOT NULL, importance REAL NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
            superseded_by INTEGER, session TEXT, vector BLOB NOT NULL);""")
    store = MemoryStore(tmp_path / "old.sqlite", HashingEmbedder(128))
    store.remember(Scope.user("d"), "The user's name is Dee.", "fact", 0.9, "name")
    assert store.recall(Scope.user("d"), "The user's name", 1)[0].used is not None


def test_the_organisation_scope_is_shared_and_separate(store):
    store.remember(Scope.org(), "The company's VPN is vpn.example.com.", "fact", 0.8)
    store.remember(Scope.user("carol"), "The user's VPN client is WireGuard.", "fact", 0.8)
    assert {m.scope for m in store.recall(Scope.user("dave"), "VPN", k=5)} == {"org"}
    assert {m.scope for m in store.recall(Scope.user("carol"), "VPN", k=5)} == {"org", "user"}
    assert store.list(Scope.org())[0].text.startswith("The company's")
    with pytest.raises(ConfigError, match="needs a user id"):
        Scope.user(" ")


def test_randomized_users_from_threads_never_see_each_other(store):
    users = [f"user{i}" for i in range(12)]
    secrets = {u: f"The user's secret word is {u}word." for u in users}
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(25):
            u = rng.choice(users)
            if rng.random() < 0.5:
                store.remember(Scope.user(u), secrets[u], "fact", 0.5, "secret word")
            for m in store.recall(Scope.user(u), "what is the secret word", k=20, include_org=False):
                if m.text != secrets[u]:
                    errors.append(f"{u} saw {m.text}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for u in users:
        assert {m.text for m in store.list(Scope.user(u), history=True)} <= {secrets[u]}


_WRITER = """
import sys
from slmforge.memory import MemoryStore, Scope
from slmforge.rag import HashingEmbedder
store = MemoryStore(sys.argv[1], HashingEmbedder(128))
for i in range(40):
    store.remember(Scope.user(sys.argv[2]), f"The user noted item {i} of {sys.argv[2]}.", "note", 0.5)
"""


def test_concurrent_processes_do_not_corrupt_the_file(tmp_path: Path):
    path = tmp_path / "m.sqlite"
    MemoryStore(path, HashingEmbedder(128)).close()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), f"p{i}"]) for i in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    again = MemoryStore(path, HashingEmbedder(128))
    assert [len(again.list(Scope.user(f"p{i}"))) for i in range(4)] == [40, 40, 40, 40]
    assert again._db().execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_erasure_removes_the_user_from_the_file_and_export_has_everything(tmp_path: Path, store):
    eve, frank = Scope.user("eve"), Scope.user("frank")
    remember_conversation(store, eve, [{"role": "user", "content": "My name is Evelyn Quartzfield."}])
    store.add_turn(eve, "s1", "user", "Please remember zanzibarquux.")
    store.remember(frank, "The user's name is Frank.", "fact", 0.9, "name")
    dump = store.export(eve)
    assert dump["memories"][0]["text"] == "The user's name is Evelyn Quartzfield." and dump["sessions"]["s1"]
    assert store.erase(eve) == 2
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("m.sqlite*"))
    assert b"Quartzfield" not in raw and b"zanzibarquux" not in raw and b"Frank" in raw
    again = MemoryStore(tmp_path / "m.sqlite", HashingEmbedder(128))
    assert again.list(eve) == [] and again.export(eve)["sessions"] == {} and len(again.list(frank)) == 1


def test_forget_removes_the_text_from_the_files_and_survives_reopening(tmp_path: Path, store):
    """One forgotten memory leaves neither the database nor its write-ahead log (the privacy gap of a plain
    DELETE, which leaves the bytes in a free page and the old page in the log), without a VACUUM; the
    others stay, also after closing and reopening the file."""
    eve = Scope.user("eve")
    keep = store.remember(eve, "The user's editor is helix.", "preference", 0.5, "editor")
    secret = store.remember(eve, "The user's locker code is zebraquux4417.", "fact", 0.9, "locker")
    assert store.forget(eve, secret) and not store.forget(eve, secret)
    assert not store.forget(Scope.user("mallory"), keep)  # another scope cannot forget it
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("m.sqlite*"))
    assert b"zebraquux4417" not in raw and b"helix" in raw
    store.close()
    again = MemoryStore(tmp_path / "m.sqlite", HashingEmbedder(128))
    assert [m.id for m in again.list(eve)] == [keep] and again.recall(eve, "editor", 1)[0].id == keep


def test_another_embedder_is_refused(tmp_path: Path):
    MemoryStore(tmp_path / "m.sqlite", HashingEmbedder(128)).close()
    with pytest.raises(ConfigError, match="written with the embedder"):
        MemoryStore(tmp_path / "m.sqlite", HashingEmbedder(64))


class Summariser:
    def __init__(self, reply: str) -> None:
        self.reply = reply

    def chat(self, messages, params):
        return [Completion(self.reply, 3, "stop")]


def test_window_keeps_the_newest_turns_in_budget_and_summarises_the_rest(store):
    gina = Scope.user("gina")
    for i in range(6):
        store.add_turn(gina, "s", "user" if i % 2 == 0 else "assistant", f"Turn number {i} says something. More.")
    count = lambda text: len(text.split())  # noqa: E731
    kept, summary = window(store, gina, "s", budget=12, count=count, generator=Summariser(""))
    assert [t["content"] for t in kept] == ["Turn number 4 says something. More.", "Turn number 5 says something. More."]
    assert summary.startswith("Earlier: user: Turn number 0 says something.")  # the model said nothing: fallback
    kept, summary = window(store, gina, "s", budget=12, count=count, generator=Summariser("They talked about turns."))
    assert summary == "They talked about turns."
    assert [m.text for m in store.list(gina) if m.kind == "summary"] == ["They talked about turns."]
    assert window(store, gina, "s", budget=1000, count=count) == (store.turns(gina, "s"), None)


class Echo:
    """An engine that answers with the system message it was given (what the server told it about the user)."""

    def chat(self, messages, params):
        system = [m["content"] for m in messages if m["role"] == "system"]
        return [Completion(system[0] if system else "(nothing)", 3, "stop")]

    def complete(self, prompt, params):
        return [Completion("x", 1, "stop")]

    def complete_batch(self, prompts, params):
        return [self.complete(p, params) for p in prompts]


def test_the_server_scopes_memory_by_api_key(tmp_path: Path):
    from slmforge.serve import create_app

    store = MemoryStore(tmp_path / "m.sqlite", HashingEmbedder(128))
    app = create_app({"echo": Echo()}, api_keys=["key-alice", "key-bob"], memory=store)
    with LiveServer(app) as url:
        alice = openai.OpenAI(base_url=f"{url}/v1", api_key="key-alice", max_retries=0)
        bob = openai.OpenAI(base_url=f"{url}/v1", api_key="key-bob", max_retries=0)

        def ask(client, text, **extra):
            return client.chat.completions.create(model="echo", messages=[{"role": "user", "content": text}],
                                                  **extra).choices[0].message.content

        ask(alice, "My name is Alice Wonder and my favorite editor is helix.")
        assert "Alice Wonder" in ask(alice, "What is my name and my favorite editor?")
        for _ in range(3):
            assert "Alice" not in ask(bob, "What is my name? my favorite editor?", user="key-alice")
        ask(bob, "My name is Bob Builder.")
        assert "Bob Builder" in ask(bob, "What is my name?") and "Bob" not in ask(alice, "What is my name?")
    names = {m.text for m in store.list(Scope.user("key-1"))} | {m.text for m in store.list(Scope.user("key-2"))}
    assert "The user's name is Alice Wonder." in names and "The user's name is Bob Builder." in names
    assert context_for(store, Scope.user("key-3"), "name") is None


def test_cli_add_search_list_forget_export_erase(tmp_path: Path):
    (tmp_path / "slmforge.yaml").write_text("project: {name: mem}\nmemory: {embedder: hashing-128}\n")
    slm("memory", "add", "My name is Hana. I prefer dark mode.", "--user", "hana", cwd=tmp_path)
    found = json.loads(slm("memory", "search", "display theme", "--user", "hana", cwd=tmp_path).stdout)
    assert any("dark mode" in m["text"] for m in found)
    listed = json.loads(slm("memory", "list", "--user", "hana", cwd=tmp_path).stdout)
    slm("memory", "forget", str(listed[0]["id"]), "--user", "hana", cwd=tmp_path)
    assert len(json.loads(slm("memory", "export", "--user", "hana", cwd=tmp_path).stdout)["memories"]) == 1
    assert "erased 1 rows" in slm("memory", "erase", "--user", "hana", cwd=tmp_path).stdout
    bad = slm("memory", "list", cwd=tmp_path, ok=False)
    assert bad.returncode == 2 and "exactly one scope" in bad.stderr


def test_the_offline_minilm_recalls_by_meaning_across_a_reopen(tmp_path: Path):
    """With the real default embedder (all-MiniLM-L6-v2, offline): a question that shares no content word
    with a memory still recalls it first, for its user only, and the file reopens with the same embedder."""
    from slmforge.config import ProjectConfig
    from slmforge.memory import open_store

    cfg = ProjectConfig().rooted_at(tmp_path)
    store = open_store(cfg)
    ada, bo = Scope.user("ada"), Scope.user("bo")
    store.remember(ada, "The user's dog is a beagle called Pepper.", "fact", 0.6, "pet")
    store.remember(ada, "The user prefers tea to coffee in the morning.", "preference", 0.6, "drink")
    store.remember(ada, "The user works on compilers at Acme.", "fact", 0.6, "work")
    store.remember(bo, "The user's cat is a grey tabby.", "fact", 0.6, "pet")
    store.close()
    again = open_store(cfg)
    assert again.recall(ada, "What animal lives with me?", 1)[0].text == "The user's dog is a beagle called Pepper."
    assert again.recall(ada, "Which hot drink should I offer?", 1)[0].text.startswith("The user prefers tea")
    assert all("tabby" not in m.text for m in again.recall(ada, "What animal lives with me?", 5))


class Recorder:
    """Records each conversation it is given; replies "reply N"."""

    def __init__(self) -> None:
        self.seen: list[list[dict]] = []

    def chat(self, messages, params):
        self.seen.append([dict(m) for m in messages])
        return [Completion(f"reply {len(self.seen)}", 2, "stop")]

    def stream(self, prompt, params):
        yield from ("re", "ply ", "streamed")

    def complete(self, prompt, params):
        return [Completion("x", 1, "stop")]

    def complete_batch(self, prompts, params):
        return [self.complete(p, params) for p in prompts]


def test_the_server_keeps_a_session_and_windows_it(tmp_path: Path):
    """With `session`, a client sends only its new message: the server adds the session's earlier turns (its
    own replies too, streamed or not), summarises those past memory.window_tokens, and keeps sessions per key."""
    from slmforge.serve import create_app
    from slmforge.serve._memory import ServerMemory

    store = MemoryStore(tmp_path / "m.sqlite", HashingEmbedder(128))
    engine = Recorder()
    app = create_app({"rec": engine}, api_keys=["key-a", "key-b"],
                     memory=ServerMemory(store, extract=False, window_tokens=40))
    with LiveServer(app) as url:
        a = openai.OpenAI(base_url=f"{url}/v1", api_key="key-a", max_retries=0)
        b = openai.OpenAI(base_url=f"{url}/v1", api_key="key-b", max_retries=0)

        def say(client, text, **extra):
            return client.chat.completions.create(model="rec", messages=[{"role": "user", "content": text}],
                                                  extra_body={"session": "s1"}, **extra)

        say(a, "My locker is number 17.")
        say(a, "And my desk is by the window.")
        assert [m["content"] for m in engine.seen[-1] if m["role"] != "system"] == [
            "My locker is number 17.", "reply 1", "And my desk is by the window."]
        text = "".join(c.choices[0].delta.content or "" for c in say(a, "Stream this.", stream=True) if c.choices)
        assert text == "reply streamed"
        say(b, "Hello from b.")
        assert [m["content"] for m in engine.seen[-1] if m["role"] != "system"] == ["Hello from b."]  # per key
        for n in range(6):  # past 40 tokens: the oldest turns become a summary
            say(a, f"Filler message number {n} with several words in it.")
        last = engine.seen[-1]
        assert any(m["role"] == "system" and m["content"].startswith("Earlier in this conversation:") for m in last)
        assert "My locker is number 17." not in [m["content"] for m in last]
        with pytest.raises(openai.BadRequestError, match="session"):
            a.chat.completions.create(model="rec", messages=[{"role": "user", "content": "x"}],
                                      extra_body={"session": ""})
    turns = store.turns(Scope.user("key-1"), "s1")
    assert turns[1] == {"role": "assistant", "content": "reply 1"} and turns[5]["content"] == "reply streamed"
