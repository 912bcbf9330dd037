"""README sentences checked against what the code and the shipped files really do. Each test quotes its sentence;
where the README states a figure, the figure is read from the README itself (`conftest.readme_figures`), so a
changed figure or a changed behaviour both turn the test red.

Backed elsewhere: `Retry-After` on 503 (test_api.py), "max abs diff 0.0" (test_interop.py), the wide batched
step's and bitsandbytes 4-bit rows' 1% (test_batching.py), the 50 fixed questions' figures of both demo models
and "merged-then-quantized ... 0%" (test_demo_model.py, slow)."""

from __future__ import annotations

import ast
import json
import types
from pathlib import Path

import pytest
from conftest import README, readme_figures
from safetensors import safe_open

from mllm.loading import BUILTIN

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("mllm", "app", "training", "scripts")


# ---- "servers bind to 127.0.0.1" ------------------------------------------------------------------------
@pytest.fixture
def bound(monkeypatch):
    """Runs `mllm api` / `mllm ui` with no flags up to the point where they bind, with the model, the app and
    the server stubbed out; returns the (host, port) each would have bound."""
    import uvicorn

    import app.api
    import app.cli
    import app.ui

    binds: dict[str, tuple[str, int]] = {}
    engine = types.SimpleNamespace(model_id="default")
    monkeypatch.setattr(app.cli, "load_engine", lambda args, **limits: engine)
    monkeypatch.setattr(app.api, "create_app", lambda engine, **kwargs: "the app")
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kwargs: binds.__setitem__("api", (host, port)))
    monkeypatch.setattr(app.ui, "build", lambda *args, **kwargs: "the page")
    monkeypatch.setattr(app.ui, "make_examples", lambda folder: [])
    monkeypatch.setattr(app.ui, "export_shelf", lambda: types.SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(app.ui, "launch", lambda demo, host, port, **kwargs: binds.__setitem__("ui", (host, port)))
    monkeypatch.delenv("MLLM_API_KEY", raising=False)
    monkeypatch.delenv("MLLM_UI_AUTH", raising=False)
    return binds


def test_servers_bind_to_loopback_by_default(bound, capsys):
    # README: "servers bind to 127.0.0.1" (and the usage lines: `mllm ui ... [--host 127.0.0.1]`).
    from app.cli import main

    assert main(["api"]) == 0 and main(["ui"]) == 0
    assert bound == {"api": ("127.0.0.1", 8000), "ui": ("127.0.0.1", 7860)}
    out = capsys.readouterr().out
    assert "http://127.0.0.1:8000/v1" in out and "http://127.0.0.1:7860" in out
    assert "warning" not in out  # loopback: nobody else can reach it, so no exposure warning
    main(["api", "--host", "0.0.0.0"])  # the flag is what opens it, and that is said
    assert bound["api"] == ("0.0.0.0", 8000) and "warning: listening on 0.0.0.0" in capsys.readouterr().out


# ---- "remote code is never trusted" ---------------------------------------------------------------------
def _is_false(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def remote_code_trusted(source: str, name: str) -> list[str]:
    """Every place in `source` that sets `trust_remote_code` to anything but the constant False: a keyword
    argument (`from_pretrained(..., trust_remote_code=x)`, `dict(trust_remote_code=x)`), a dict entry
    (`{"trust_remote_code": x}`, `**{...}`), an item or attribute assignment."""
    found = []
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and not _is_false(node.value):
            found.append(f"{name}:{node.value.lineno}")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and not _is_false(value):
                    found.append(f"{name}:{key.lineno}")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and not _is_false(node.value):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                key = target.slice if isinstance(target, ast.Subscript) else target
                if (isinstance(key, ast.Constant) and key.value == "trust_remote_code") or (
                    isinstance(key, ast.Attribute) and key.attr == "trust_remote_code"
                ):
                    found.append(f"{name}:{node.lineno}")
    return found


def test_remote_code_is_never_trusted_anywhere_in_the_source():
    # README: "Weights are safetensors only, remote code is never trusted" and "never code (remote code is
    # never trusted)". transformers runs a checkpoint's own Python only when trust_remote_code is true.
    files = sorted(path for folder in SOURCE_DIRS for path in (REPO / folder).rglob("*.py"))
    assert len(files) > 40  # the whole source, not an empty glob
    found = [hit for path in files for hit in remote_code_trusted(path.read_text(), str(path.relative_to(REPO)))]
    assert found == [], f"trust_remote_code set to something other than False at {found}"


def test_the_remote_code_scan_finds_every_way_of_setting_it():
    planted = [
        "AutoModel.from_pretrained(p, trust_remote_code=True)",
        "kwargs = dict(dtype=d, trust_remote_code=flag)",
        "load(**{'trust_remote_code': True})",
        "kwargs['trust_remote_code'] = True",
        "config.trust_remote_code = True",
    ]
    for line in planted:
        assert remote_code_trusted(line, "planted.py") == ["planted.py:1"], line
    assert remote_code_trusted("AutoConfig.from_pretrained(p, trust_remote_code=False)", "ok.py") == []


# ---- "8192 for the default model" -----------------------------------------------------------------------
def test_the_default_models_context_length_is_the_readmes():
    # README: "the checkpoint's `context_length`, else the tokenizer's limit, else the LLM's
    # `max_position_embeddings`: 8192 for the default model".
    from mllm.loading import load_processor

    (figure,) = readme_figures(r"`max_position_embeddings`: (\d+) for the default model")
    shipped = json.loads((BUILTIN["default"] / "mllm_config.json").read_text())
    assert shipped["context_length"] == int(figure)
    assert load_processor("default").max_length == int(figure)  # what every entry point refuses past


# ---- the typed errors and their codes -------------------------------------------------------------------
#: The API error code of each class, as the README's bad-input table names them (CheckpointError, a model
#: directory that does not load, is no request error: its code is mllm/errors.py's `invalid_model`).
CODES = {
    "MLLMError": "invalid_request",
    "ImageError": "invalid_image",
    "MessageError": "invalid_request",
    "TooManyImagesError": "too_many_images",
    "ContextLengthError": "context_length_exceeded",
    "CheckpointError": "invalid_model",
    "UnexportableError": "invalid_model",
    "GrammarError": "invalid_schema",
}


def test_each_error_class_the_readme_names_exists_with_its_api_code(tmp_path):
    # README: "each kind of problem has its own error class (`mllm.MLLMError` and its subclasses `ImageError`,
    # `MessageError`, `TooManyImagesError`, `ContextLengthError`, `CheckpointError`, `UnexportableError`, each with
    # the API error `code` it maps to)".
    import mllm.errors
    from mllm.loading import load_model

    (named,) = readme_figures(r"\(`mllm.MLLMError` and its subclasses ((?:`\w+`, )+)each with the API error")
    subclasses = [name.strip("` ") for name in named.split(",") if name.strip()]
    defined = [n for n, c in vars(mllm.errors).items() if isinstance(c, type) and issubclass(c, mllm.errors.MLLMError)]
    assert sorted(["MLLMError", *subclasses]) == sorted(defined) == sorted(CODES)
    for name, code in CODES.items():
        cls = getattr(mllm, name)  # the public entry exports each
        assert issubclass(cls, mllm.MLLMError) and issubclass(cls, ValueError)
        assert cls.code == code, (name, cls.code)
    for code in ("invalid_image", "too_many_images", "context_length_exceeded", "invalid_request"):
        assert f"`{code}`" in README.read_text()  # the table says which input gets which
    with pytest.raises(mllm.CheckpointError) as err:  # a directory that is no checkpoint
        load_model(str(tmp_path), device="cpu", quantization="none")
    assert err.value.code == "invalid_model"


# ---- the shipped weights' sizes -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, sentence",
    [
        (
            "default",
            r"The connector and adapter ship in `mllm/assets/demo` \((\d+(?:\.\d+)?) MB of float16 safetensors\)",
        ),
        ("default-qformer", r"\(`mllm/assets/demo-qformer`, (\d+(?:\.\d+)?) MB of float16 safetensors"),
    ],
)
def test_the_shipped_weights_are_the_readmes_size_in_float16(name, sentence):
    (figure,) = readme_figures(sentence)
    files = sorted(BUILTIN[name].rglob("*.safetensors"))
    assert {f.relative_to(BUILTIN[name]).as_posix() for f in files} == {
        "connector.safetensors",
        "adapter/adapter_model.safetensors",
    }
    dtypes = set()
    for path in files:
        with safe_open(path, "pt") as handle:
            dtypes |= {str(handle.get_slice(key).get_dtype()) for key in handle.keys()}
    assert dtypes == {"F16"}
    megabytes = sum(path.stat().st_size for path in files) / 1e6
    decimals = len(figure.partition(".")[2])
    # The README's figure, to the precision it is written with (12.5 MB: 12.45-12.55 MB).
    assert abs(megabytes - float(figure)) <= 0.5 * 10**-decimals + 1e-9, f"{megabytes:.2f} MB, README: {figure} MB"
