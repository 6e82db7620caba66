"""The README says what the code does: its tables come from the code and must not drift."""

from __future__ import annotations

from pathlib import Path

from hermes_orchestration.reasons import markdown_table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_lists_every_reason_code_as_the_catalogue_defines_it() -> None:
    assert markdown_table().strip() in README.read_text(encoding="utf-8")


def test_the_readme_test_command_is_what_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "scripts/test" in README.read_text(encoding="utf-8")
    assert "exec ./scripts/test" in ci
