"""Project config: templates, merge order, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from slmforge.config import PROJECT_FILE, ProjectConfig, init_project, load_config, render_template
from slmforge.errors import ConfigError


@pytest.mark.parametrize("template", ["quickstart", "adapt", "blank"])
def test_template_is_valid_and_documents_every_key(tmp_path, template):
    path = init_project(tmp_path, template)
    text = path.read_text()
    cfg = load_config(path)
    assert cfg.base_dir == tmp_path.resolve()
    # Every field of every section appears, preceded by its comment.
    def walk(section, prefix=""):
        for name, field in type(section).model_fields.items():
            assert f"{name}:" in text, f"{prefix}{name} missing from the {template} template"
            if field.description:
                assert field.description in text
            value = getattr(section, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name}.")

    walk(cfg)
    # The file parses to exactly the template's values.
    assert ProjectConfig.model_validate(yaml.safe_load(text)).model_dump() == cfg.model_dump()


def test_quickstart_template_uses_python_docs(tmp_path):
    cfg = load_config(init_project(tmp_path, "quickstart"))
    assert cfg.data.sources == ["python-docs"]


def test_init_refuses_to_overwrite(tmp_path):
    init_project(tmp_path)
    with pytest.raises(ConfigError, match="already exists"):
        init_project(tmp_path)
    init_project(tmp_path, "blank", force=True)
    assert load_config(tmp_path / PROJECT_FILE).data.sources == []


def test_merge_order_defaults_file_set(tmp_path):
    f = tmp_path / PROJECT_FILE
    f.write_text("data:\n  split:\n    val: 0.2\n  dedup:\n    shingle_size: 7\n")
    cfg = load_config(f, ["data.split.val=0.3", "data.sources=[a, b]", "tokenizer.domain_terms_top_n=5"])
    assert cfg.data.split.val == 0.3  # --set beats the file
    assert cfg.data.dedup.shingle_size == 7  # the file beats the defaults
    assert cfg.data.split.test == 0.05  # defaults fill the rest
    assert cfg.data.sources == ["a", "b"]
    assert cfg.tokenizer.domain_terms_top_n == 5
    assert cfg.resolve("x") == tmp_path.resolve() / "x"
    assert cfg.stage_dir("data") == tmp_path.resolve() / "runs" / "data"


def test_rooted_at_resolves_paths_there_and_leaves_the_original(tmp_path):
    cfg = ProjectConfig.model_validate({"data": {"sources": ["a"]}, "sft": {"out": "mine/sft"}})
    rooted = cfg.rooted_at(tmp_path)
    assert rooted.base_dir == tmp_path and cfg.base_dir != tmp_path
    assert rooted.stage_dir("data") == tmp_path / "runs" / "data"
    assert rooted.stage_dir("sft", rooted.sft.out) == tmp_path / "mine" / "sft"
    assert rooted.resolve("/abs/x") == Path("/abs/x")
    rooted.data.sources.append("b")  # a deep copy: editing it leaves the original alone
    assert cfg.data.sources == ["a"]


def test_unknown_key_names_path_line_and_allowed_keys(tmp_path):
    f = tmp_path / PROJECT_FILE
    f.write_text("project:\n  name: x\ndata:\n  dedup:\n    exact: true\n    treshold: 0.9\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    msg = str(info.value)
    assert "data.dedup.treshold" in msg
    assert "line 6" in msg
    assert "near_threshold" in msg  # the allowed keys are listed


def test_wrong_type_names_value_and_allowed_values(tmp_path):
    f = tmp_path / PROJECT_FILE
    f.write_text("data:\n  synth:\n    method: magic\n  split:\n    val: lots\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    msg = str(info.value)
    assert "data.synth.method" in msg and "'magic'" in msg and "'template' or 'teacher'" in msg
    assert "data.split.val" in msg and "'lots'" in msg and "line 5" in msg


def test_bad_set_override(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["data.split.val"])
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.dedup.num_perm=3"])
    assert "from --set data.dedup.num_perm=3" in str(info.value)
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["project.name=a", "project.name.x=1"])


def test_malformed_yaml_and_missing_file(tmp_path):
    f = tmp_path / PROJECT_FILE
    f.write_text("data:\n  sources: [a, b\n  split: 3\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(f)
    f.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_render_template_unknown():
    with pytest.raises(ConfigError, match=r"choose one of: quickstart, adapt, code, .*blank"):
        render_template("fancy")
