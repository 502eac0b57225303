"""Hugging Face style Jinja chat templates, rendered in a sandbox (ChatML by default).

``render_chat_template(template, messages)`` is what every tokenizer's ``apply_chat_template``
calls; compiled templates are cached by their source text.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Mapping, Sequence

__all__ = ["CHATML_TEMPLATE", "render_chat_template"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_JINJA_CACHE: dict[str, Any] = {}


def _compile(template: str):
    if template in _JINJA_CACHE:
        return _JINJA_CACHE[template]
    try:  # third-party, imported when a chat template is first rendered
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 ships with every supported setup
        raise ImportError("rendering chat templates needs jinja2: pip install jinja2") from e
    class _Generation(Extension):
        """``{% generation %}…{% endgeneration %}`` (assistant-mask markers): render the body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    compiled = env.from_string(template)
    _JINJA_CACHE[template] = compiled
    return compiled


def render_chat_template(template: str | None, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = True, **context: Any) -> str:
    """Render a HF-style Jinja chat template (ChatML when ``template`` is None)."""
    if not messages:
        raise ValueError("apply_chat_template needs at least one message")
    for m in messages:
        if "role" not in m or "content" not in m:
            raise ValueError(f"chat messages need 'role' and 'content' keys, got {dict(m)}")
    compiled = _compile(template or CHATML_TEMPLATE)
    return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                           **context)
