"""How the project is packaged: pyproject.toml in the current form, so
that `make setup` installs without setuptools' deprecation boxes."""

from __future__ import annotations

import re
import tomllib

from tests.relay import REPO


def test_the_license_is_an_spdx_expression_setuptools_understands() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())

    # PEP 639: a string, not the {text = ...} table that setuptools calls
    # deprecated ("project.license as a TOML table is deprecated").
    assert pyproject["project"]["license"] == "MIT"
    # ... which setuptools reads from 77.0 on.
    [setuptools] = [requirement for requirement in
                    pyproject["build-system"]["requires"]
                    if requirement.startswith("setuptools")]
    match = re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", setuptools)
    assert match is not None, setuptools
    assert int(match.group(1)) >= 77
