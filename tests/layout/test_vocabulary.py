"""Each word of the vocabulary is declared once: the enums and row words in :mod:`nvit.vocab` (and the few
declared next to what uses them), and the service's schemas derived from them, never copied."""

from __future__ import annotations

import ast
import dataclasses
import enum
import typing
from pathlib import Path

import pytest

import nvit
from nvit.lut.meta import LUT_FILE_KIND, READABLE_SCHEMA_VERSIONS
from nvit.profiler.backends.cuda_timer import CUDA_APIS
from nvit.profiler.backends.onnxruntime_backend import OrtProvider
from nvit.profiler.backends.torch_backend import COMPILE_MODES
from nvit.profiler.base import get_backend
from nvit.profiler.harness import HarnessConfig, RobustStatistic
from nvit.service import schemas
from nvit.service.jobspec import MeasureRequest, ProfileRequest
from nvit.vocab import DeviceKind, Precision

PACKAGE = Path(nvit.__file__).parent
BUILTIN_BACKENDS = ("onnxruntime", "tensorrt", "torch")


def _literal_values(annotation: object) -> set[object]:
    """The values of a ``Literal[...]`` (optionally ``| None``)."""
    out: set[object] = set()
    for arg in typing.get_args(annotation) or ():
        if typing.get_origin(arg) is typing.Literal:
            out |= set(typing.get_args(arg))
    if typing.get_origin(annotation) is typing.Literal:
        out |= set(typing.get_args(annotation))
    return out


def _field_values(model: type, name: str) -> set[object]:
    return _literal_values(model.model_fields[name].annotation)


def _values(e: type[enum.Enum]) -> set[str]:
    return {m.value for m in e}


def test_the_schemas_name_exactly_the_enums_values() -> None:
    assert _field_values(schemas.TableMetaSchema, "precision") == _values(Precision)
    assert _field_values(schemas.TableMetaSchema, "device_kind") == _values(DeviceKind)
    assert _field_values(schemas.DeviceIdentity, "kind") == _values(DeviceKind)
    assert _field_values(schemas.TableMetaSchema, "schema_version") == set(READABLE_SCHEMA_VERSIONS)
    assert _field_values(schemas.TableMetaSchema, "kind") == {LUT_FILE_KIND}
    assert _field_values(schemas.HarnessOptions, "statistic") == _values(RobustStatistic)
    assert _field_values(schemas.BackendOptions, "provider") == _values(OrtProvider)
    assert _field_values(schemas.BackendOptions, "compile_mode") == set(COMPILE_MODES)
    assert _field_values(schemas.BackendOptions, "buffers") == set(CUDA_APIS)
    for job in (ProfileRequest, MeasureRequest):
        assert _field_values(job, "precision") == _values(Precision)
        assert _field_values(job, "device") == _values(DeviceKind)


def test_the_harness_options_are_the_harness_config() -> None:
    assert set(schemas.HarnessOptions.model_fields) == {f.name for f in dataclasses.fields(HarnessConfig)}


def test_the_backend_options_are_every_backends_options() -> None:
    """What a remote job may set plus what stays the agent's business is exactly what the backends accept."""
    accepted: set[str] = set()
    local: set[str] = set()
    for name in BUILTIN_BACKENDS:
        cls = get_backend(name)
        assert cls.option_names is not None, name
        accepted |= cls.option_names
        local |= cls.local_options
    remote = set(schemas.BackendOptions.model_fields) - {"harness"}
    assert remote | set(schemas.LOCAL_OPTIONS) == accepted
    assert not remote & set(schemas.LOCAL_OPTIONS)
    assert local <= set(schemas.LOCAL_OPTIONS)


@pytest.mark.parametrize("bad", [{"precision": "fp8"}, {"device": "tpu"}])
def test_a_word_outside_the_vocabulary_is_refused(bad: dict[str, str]) -> None:
    from pydantic import ValidationError

    good = {"kind": "measure", "models": [{"name": "m", "arch": "vit_test"}]}
    assert MeasureRequest.model_validate(good).precision == "fp32"
    with pytest.raises(ValidationError):
        MeasureRequest.model_validate(good | bad)


def _top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_each_vocabulary_word_is_declared_once() -> None:
    words = _top_level_names(PACKAGE / "vocab.py")
    assert {"Precision", "DeviceKind", "TimingMode", "PartKind", "PartConfig", "KIND_FIELDS"} <= words
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "vocab.py":
            continue
        again = words & _top_level_names(path)
        assert not again, f"{path.relative_to(PACKAGE)} declares {sorted(again)} again"


def test_the_vocabulary_has_one_import_path() -> None:
    """No module re-exports a vocabulary word (an ``__all__`` naming it, or a shim that only re-imports)."""
    words = _top_level_names(PACKAGE / "vocab.py")
    assert not (PACKAGE / "profiler" / "parts.py").exists()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                    for t in node.targets):
                exported = {e.value for e in ast.walk(node.value) if isinstance(e, ast.Constant)}
                if path.name != "vocab.py":
                    assert not exported & words, f"{path.relative_to(PACKAGE)} re-exports {sorted(exported & words)}"


def test_no_module_copies_an_enums_values_into_a_literal() -> None:
    copied = [_values(e) for e in (Precision, DeviceKind, RobustStatistic, OrtProvider)]
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Literal":
                strings = {c.value for c in ast.walk(node.slice) if isinstance(c, ast.Constant)}
                for values in copied:
                    assert not (len(strings & values) >= 2), \
                        f"{path.relative_to(PACKAGE)}:{node.lineno} copies {sorted(strings & values)}"
