"""docs/reference.md is generated from the CRD and must be current; docs links resolve."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "deepspeedinferences.deepspeed.ai.yaml"


def gen() -> ModuleType:
    path = ROOT / "docs" / "gen_reference.py"
    spec = importlib.util.spec_from_file_location("gen_reference", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def leaf_paths(schema: dict[str, Any], path: str) -> list[str]:
    out = [path]
    target, suffix = schema, ""
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        target, suffix = schema["items"], "[]"
    for name, sub in target.get("properties", {}).items():
        out += leaf_paths(sub, f"{path}{suffix}.{name}")
    return out


def test_reference_is_current() -> None:
    want = gen().render(gen().load_crd(CRD))
    have = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    assert have == want, "docs/reference.md is stale: run `python docs/gen_reference.py`"


def test_batch_reference_is_current() -> None:
    mod = gen()
    want = mod.render(mod.load_crd(mod.BATCH_CRD_PATH))
    have = (ROOT / "docs" / "reference-batch.md").read_text(encoding="utf-8")
    assert have == want, "docs/reference-batch.md is stale: run `python docs/gen_reference.py`"
    assert "`kubectl get dsbi`" in have and "| `spec.input.path` |" in have


def test_reference_lists_every_spec_and_status_field_with_a_description() -> None:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]["properties"]
    text = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    for part in ("spec", "status"):
        for path in leaf_paths(schema[part], part)[1:]:
            assert f"| `{path}` |" in text, f"{path} missing from docs/reference.md"
    # Every spec field documents itself (kubectl explain shows the same text).
    for line in text.splitlines():
        if line.startswith("| `spec."):
            assert line.rstrip().rstrip("|").rsplit("|", 1)[1].strip(), f"no description: {line}"


def test_check_mode_detects_a_stale_page(tmp_path: Path) -> None:
    mod = gen()
    out = tmp_path / "reference.md"
    out.write_text("stale\n")
    mod.PAGES = ((mod.CRD_PATH, out), (mod.BATCH_CRD_PATH, tmp_path / "reference-batch.md"))
    assert mod.main(["--check"]) == 1
    assert mod.main([]) == 0
    assert mod.main(["--check"]) == 0


def test_docs_relative_links_resolve() -> None:
    for doc in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "CHANGELOG.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_changelog_follows_keep_a_changelog() -> None:
    from dsi_operator._version import __version__

    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    assert re.search(rf"^## \[{re.escape(__version__)}\]", text, re.MULTILINE)
    assert "Keep a Changelog" in text
