"""How dn sums up a failed engine run: the engine's error lines, and the exception a provider raised."""
from pathlib import Path

from dn import engine

DATA = Path(__file__).resolve().parents[1] / "data" / "engine"


def test_a_provider_traceback_ends_in_the_exception_it_raised():
    """Recorded from a real preview whose dynamic provider raised InvalidInput in ``diff``: the
    summary names the exception, not only "Traceback (most recent call last):"."""
    out = (DATA / "provider-traceback.stdout").read_text()
    lines = engine._error_lines(engine._Result("1", out, "")).splitlines()
    assert "dn.errors.InvalidInput: network: must be a network name" in lines
    assert "error: Resource monitor has terminated, shutting down" in lines
    assert not any(ln.startswith(("File ", "return ", "^")) for ln in lines)


def test_plain_lines_are_kept_when_nothing_says_error():
    r = engine._Result("1", "one\ntwo\nthree\n", "")
    assert engine._error_lines(r, limit=2) == "two\nthree"
