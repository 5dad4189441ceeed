"""docs/methods.md has one settings table per method (the paper's value, the reference code's, our default, our
reading, what departs), and the engine's table for the settings every mask learner shares: the defaults printed
there are the code's, setting by setting, so the page cannot drift from `prunebench methods NAME --json`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from suite.methods.mask_learning import MaskLearner
from suite.methods.pruner import get_method, methods

DOC = Path(__file__).resolve().parent.parent / "docs" / "methods.md"


def _section(text: str, heading: str) -> str:
    """The body of the level-2 section whose heading line matches `heading` (up to the next level-2 heading)."""
    match = re.search(rf"^## {heading}.*$", text, flags=re.M)
    assert match, f"docs/methods.md has no section {heading!r}"
    end = re.search(r"^## ", text[match.end():], flags=re.M)
    return text[match.end(): match.end() + end.start() if end else len(text)]


def _defaults(section: str) -> dict[str, str]:
    """{setting: default as written} from every table in `section` whose header has an `our default` column."""
    out: dict[str, object] = {}
    column = None
    for line in section.splitlines():
        if not line.startswith("|"):  # a table ends at its first other line
            column = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "setting":
            column = cells.index("our default")
        elif column is not None and not set(cells[0]) <= {"-"}:
            assert cells[0] not in out, f"setting {cells[0]} listed twice"
            out[cells[0]] = cells[column].strip("`")
    return out


def _same(doc: str, code: object) -> bool:
    """The written default (YAML, as a config would spell it) is the code's; a string is compared as written."""
    if isinstance(code, str):
        return doc == code
    value = yaml.safe_load(doc)
    if isinstance(code, float) and isinstance(value, int | float):
        return value == pytest.approx(code, rel=1e-3)
    return value == code


@pytest.mark.parametrize("name", sorted(methods()))
def test_every_default_in_the_docs_is_the_codes(name):
    text = DOC.read_text()
    cls = get_method(name)
    documented = _defaults(_section(text, rf".*\(`{name}`\)"))
    if issubclass(cls, MaskLearner):  # the engine's settings, unless the method's table restates one
        documented = _defaults(_section(text, "The mask-learning engine")) | documented
    fields = cls.Config.model_fields
    assert set(documented) == set(fields), (f"{name}: undocumented {sorted(set(fields) - set(documented))}, "
                                            f"not settings {sorted(set(documented) - set(fields))}")
    for setting, info in fields.items():
        code = info.get_default(call_default_factory=True)
        assert _same(documented[setting], code), f"{name}.{setting}: docs say {documented[setting]!r}, code {code!r}"
    assert all(s in documented for s in cls.Config.budget)


def test_published_defaults_have_every_project_addition_off():
    """A row called `ddp` or `hard_concrete` is the published method: no wait, no dense start, plain ascent, no
    polish; hard-concrete with Sheared-LLaMA's start and warm-up. The additions live in a preset and label rows."""
    ddp, hc = get_method("ddp").Config(), get_method("hard_concrete").Config()
    for config in (ddp, hc, get_method("maskprune").Config()):
        assert config.overshoot == "none" and config.polish == 0 and config.preset is None
        assert config.departures() == {}
    assert not ddp.wait and not ddp.dense_start
    assert hc.log_alpha_init == 5.0 and hc.target_warmup == 0.2 and hc.clamp == 4.6
    safe = get_method("ddp").Config(preset="budget-safe")
    assert safe.wait and safe.dense_start and safe.overshoot == "reset"
    assert safe.departures() == {"preset": "budget-safe"}
    assert get_method("ddp").Config(preset="budget-safe", wait=False).departures() == {"preset": "budget-safe",
                                                                                       "wait": False}
