"""core/cli.py: Hydra's composition errors become one line, and the quoting it suggests for a value gives Hydra
the literal value."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from core.cli import hydra_error_line, quoted_override
from tests.support import compose_train


def test_hydra_errors_become_one_line() -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(["train.stepz=3"])
    assert hydra_error_line(info.value) == (
        "unknown option train.stepz: check its spelling (--cfg job prints every option)"
    )
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(["model=nope"])
    assert hydra_error_line(info.value) == (
        "In 'train': Could not find 'model/nope'; Available options in 'model': johnson"
    )


@pytest.mark.parametrize("value", ["a=b.jpg", "Zoë (2).jpg", "it's.jpg", 'say "hi".jpg', "x,y.png"])
def test_the_suggested_quoting_gives_hydra_the_literal_value(value: str) -> None:
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    (word,) = shlex.split(quoted_override(f"input={value}"))  # what the shell hands to the program
    (override,) = OverridesParser.create().parse_overrides([word])
    assert override.key_or_group == "input" and override.value() == value
