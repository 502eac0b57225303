"""Hugging Face style Jinja chat templates, rendered in a sandbox (ChatML by default).

``render_chat_template(template, messages, **context)`` is what every tokenizer's
``apply_chat_template`` calls; compiled templates are cached by their source text. Extra context
variables (``enable_thinking=False`` for Qwen3, ``date_string`` for Llama 3, ...) are the template's
own options, as in ``transformers``' ``apply_chat_template(..., **kwargs)``: a template reads the
ones it knows and ignores the rest. :data:`RESERVED_CONTEXT` names the variables the renderer and
the tokenizers set themselves.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Mapping, Sequence

__all__ = ["CHATML_TEMPLATE", "RESERVED_CONTEXT", "check_template_kwargs", "render_chat_template"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# set by render_chat_template / the tokenizers' apply_chat_template, never by a user's kwargs
RESERVED_CONTEXT = ("messages", "add_generation_prompt", "bos_token", "eos_token")

_JINJA_CACHE: dict[str, Any] = {}


def check_template_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``kwargs`` can be passed to a chat template as extra context:
    identifier keys, none of :data:`RESERVED_CONTEXT`.

    >>> check_template_kwargs({"enable_thinking": False})
    >>> check_template_kwargs({"messages": []})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: chat template kwargs may not set 'messages' (set by the renderer: ...)
    """
    for key in kwargs:
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"chat template kwargs need identifier keys, got {key!r}")
        if key in RESERVED_CONTEXT:
            raise ValueError(f"chat template kwargs may not set {key!r} (set by the renderer: "
                             f"{', '.join(RESERVED_CONTEXT)})")


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
    """Render a HF-style Jinja chat template (ChatML when ``template`` is None); ``context``
    holds extra template variables (e.g. ``enable_thinking=False``; see
    :func:`check_template_kwargs`)."""
    if not messages:
        raise ValueError("apply_chat_template needs at least one message")
    for m in messages:
        if "role" not in m or "content" not in m:
            raise ValueError(f"chat messages need 'role' and 'content' keys, got {dict(m)}")
    compiled = _compile(template or CHATML_TEMPLATE)
    return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                           **context)
