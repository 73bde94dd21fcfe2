"""The committed fixtures are exactly what the scripts in fixtures/ (make_*.py) make, byte for byte."""

from __future__ import annotations

import pytest

from tests.helpers import FIXTURES, fixture_script

SCRIPTS = sorted(FIXTURES.glob("make_*.py"))


def test_every_committed_fixture_comes_from_a_script(tmp_path):
    for script in SCRIPTS:
        fixture_script(script).main(tmp_path)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(FIXTURES) for p in FIXTURES.rglob("*") if p.is_file() and p.suffix != ".py")
    assert made == committed
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (FIXTURES / rel).read_bytes(), f"{rel} differs"


def test_there_are_fixture_scripts():
    assert len(SCRIPTS) >= 2, SCRIPTS
    pytest.importorskip("lycoris")  # make_lycoris_fixtures builds its files with lycoris-lora's own classes
