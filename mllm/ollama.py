"""Ollama's side of a GGUF export: the `Modelfile` (both files, the chat template as a Go template, the stop
tokens) and the export's README with the one-line commands.

Ollama renders prompts with Go templates, not Jinja, so the model's chat template is translated by probing it:
rendering small conversations with sentinel contents gives the text the template writes before and after each
role's content, the opening it writes without a system message, and its generation prompt. The translation is
then checked by rebuilding the renders of other conversations from those pieces; a template that does not
decompose that way (one whose output depends on more than the role) gets no TEMPLATE line, and the README says so.
Ollama puts each image into the user's content itself.
"""

from __future__ import annotations

from mllm.templates import render

_SENTINEL = "\x01{}\x01"
_PROBES = (
    ("user",),
    ("system", "user"),
    ("user", "assistant", "user", "assistant", "user"),
    ("system", "user", "assistant", "user", "assistant", "user"),
)


def _pieces(tokenizer, template: str) -> dict[str, str] | None:
    """Per role (prefix, suffix) around its content, the no-system head and the generation prompt; None when the
    template does not decompose into them."""

    def text(*roles: str, gen: bool = False) -> str:
        messages = [{"role": r, "content": _SENTINEL.format(f"{r}{i}")} for i, r in enumerate(roles)]
        return render(tokenizer, template, messages, gen)

    def around(rendered: str, content: str) -> tuple[str, str]:
        at = rendered.index(content)
        return rendered[:at], rendered[at + len(content) :]

    u0 = _SENTINEL.format("user0")
    user, user_asked = text("user"), text("user", gen=True)
    ua, uau = text("user", "assistant"), text("user", "assistant", "user")
    if not (user_asked.startswith(user) and ua.startswith(user) and uau.startswith(ua)):
        return None
    pieces = {"gen": user_asked[len(user) :]}
    pieces["user_pre"], pieces["user_suf"] = around(uau[len(ua) :], _SENTINEL.format("user2"))
    pieces["assistant_pre"], pieces["assistant_suf"] = around(ua[len(user) :], _SENTINEL.format("assistant1"))
    head, rest = around(user, u0)
    if not head.endswith(pieces["user_pre"]) or rest != pieces["user_suf"]:
        return None
    pieces["head"] = head[: len(head) - len(pieces["user_pre"])]
    with_system = text("system", "user")
    if _SENTINEL.format("system0") not in with_system:  # a template that drops system messages (`plain`)
        pieces["system_pre"] = pieces["system_suf"] = None
        return pieces
    system_head, rest = around(with_system, _SENTINEL.format("system0"))
    tail = pieces["user_pre"] + _SENTINEL.format("user1") + pieces["user_suf"]
    if not rest.endswith(tail):
        return None
    pieces["system_pre"], pieces["system_suf"] = system_head, rest[: len(rest) - len(tail)]
    return pieces


def _rebuild(pieces: dict[str, str], roles: tuple[str, ...]) -> str:
    """What the Go template writes for `roles` (sentinel contents), as Ollama would render it."""
    keeps_system = pieces["system_pre"] is not None
    out = "" if "system" in roles and keeps_system else pieces["head"]
    for i, role in enumerate(roles):
        if role != "system" or keeps_system:
            out += pieces[f"{role}_pre"] + _SENTINEL.format(f"{role}{i}") + pieces[f"{role}_suf"]
    return out + pieces["gen"]


def go_template(tokenizer, template: str, adds_bos: bool) -> str | None:
    """The chat template as an Ollama Go template, or None where it cannot be translated faithfully. With
    `adds_bos`, the leading BOS is left to llama.cpp's tokenizer, which Ollama runs with it on."""
    try:
        pieces = _pieces(tokenizer, template)
    except Exception:  # a template that refuses a probe conversation (e.g. roles out of its order)
        return None
    if pieces is None:
        return None
    if any(_rebuild(pieces, roles) != render(tokenizer, template, _messages(roles), True) for roles in _PROBES):
        return None
    bos = tokenizer.bos_token or ""
    keeps_system = pieces["system_pre"] is not None
    if adds_bos and bos:
        for key in ("head", "system_pre") if keeps_system else ("head",):
            pieces[key] = pieces[key].removeprefix(bos)
    if any("{{" in piece or '"""' in piece for piece in pieces.values() if piece):
        return None  # would be read as a Go action, or would end the Modelfile's quoted block
    p = pieces
    if keeps_system:
        head = f"{{{{ if not .System }}}}{p['head']}{{{{ end }}}}" if p["head"] else ""
        system = f"{p['system_pre']}{{{{ .Content }}}}{p['system_suf']}"
    else:
        head, system = p["head"], ""  # the template writes no system message
    return (
        head + "{{ range .Messages }}"
        f'{{{{ if eq .Role "system" }}}}{system}'
        f'{{{{ else if eq .Role "user" }}}}{p["user_pre"]}{{{{ .Content }}}}{p["user_suf"]}'
        f'{{{{ else if eq .Role "assistant" }}}}{p["assistant_pre"]}{{{{ .Content }}}}{p["assistant_suf"]}'
        "{{ end }}{{ end }}" + p["gen"]
    )


def _messages(roles: tuple[str, ...]) -> list[dict]:
    return [{"role": r, "content": _SENTINEL.format(f"{r}{i}")} for i, r in enumerate(roles)]


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def modelfile(model, llm_file: str, mmproj_file: str, adds_bos: bool) -> str:
    """Ollama's Modelfile for the export: FROM the LLM and the mmproj, TEMPLATE, a stop per stop token, greedy."""
    processor = model.processor
    tokenizer = processor.tokenizer
    lines = [f"FROM ./{llm_file}", f"FROM ./{mmproj_file}"]
    template = go_template(tokenizer, processor.template, adds_bos)
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# the chat template could not be translated to a Go template; Ollama falls back to its own")
    for token in tokenizer.convert_ids_to_tokens(list(processor.stop_token_ids)):
        lines.append(f"PARAMETER stop {_quoted(token)}")
    lines += ["# greedy, as `mllm chat` answers by default", "PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"


def readme(llm_file: str, mmproj_file: str, check_lines: list[str]) -> str:
    """The export's README: what is here, the commands, the check's figures."""
    checked = "\n".join(f"- {line}" for line in check_lines) or "- not run (exported with --no-check)"
    return f"""# GGUF export

- `{llm_file}`: the LLM (a LoRA adapter merged before quantizing), with its chat template
- `{mmproj_file}`: the vision tower and connector (llama.cpp's `mmproj`)
- `Modelfile`: Ollama's recipe (both files, the chat template, stop tokens)

## Run it

```bash
ollama create my-vlm -f Modelfile && ollama run my-vlm "What is in this picture? ./photo.jpg"
llama-server -m {llm_file} --mmproj {mmproj_file} --jinja --port 8080
llama-mtmd-cli -m {llm_file} --mmproj {mmproj_file} --image photo.jpg -p "What is in this picture?"
```

## Checked against the original (mllm, torch float32), greedy, the same images and questions

{checked}
"""
