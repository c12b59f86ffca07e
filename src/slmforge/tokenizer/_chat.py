"""The built-in ChatML chat template."""

from __future__ import annotations

import json
import re

_CHATML = """\
{%- if bos_token %}{{ bos_token }}{% endif %}
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- @START@ + 'assistant\\n' }}
        {%- generation %}{{ message['content'] + @END@ }}{% endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- @START@ + message['role'] + '\\n' + message['content'] + @END@ + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- @START@ + 'assistant\\n' }}
{%- endif %}
"""


def chatml_template(chat_start: str, chat_end: str) -> str:
    """ChatML with the configured role markers.

    The assistant's content *and its closing marker* sit inside
    ``{% generation %}``: ``return_assistant_tokens_mask`` then marks what an SFT
    loss should train on, including the end-of-turn token, without which a
    fine-tuned model never learns to stop.
    """
    # json.dumps gives a double-quoted literal that Jinja reads back unchanged.
    literals = {"@START@": json.dumps(chat_start), "@END@": json.dumps(chat_end)}
    return re.sub("@START@|@END@", lambda m: literals[m.group(0)], _CHATML)
