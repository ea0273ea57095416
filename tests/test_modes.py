"""One vocabulary of mode names: the decoders' registry, the server's schema and CLIs, the benchmark."""

import typing

import pytest

from trimode.decode import REGISTRY
from trimode.modes import MODE_NAMES, SPECULATIVE_MODES, Mode


def test_every_mode_has_a_decoder_and_formats_as_its_name():
    assert set(REGISTRY) == set(Mode) and MODE_NAMES == ("ar", "diffusion", "linear", "quadratic")
    assert f"{Mode.LINEAR}" == str(Mode.LINEAR) == "linear" and Mode.parse("quadratic") is Mode.QUADRATIC
    assert set(SPECULATIVE_MODES) == {m.value for m, d in REGISTRY.items() if d.speculative}
    with pytest.raises(ValueError, match="unknown mode 'beam'"):
        Mode.parse("beam")


def test_the_server_and_bench_take_their_choices_from_it():
    pytest.importorskip("pydantic")
    from trimode.bench.cli import MODES as BENCH
    from trimode.serve import schemas
    from trimode.serve.engine import SPEC_MODES

    literal = typing.get_args(typing.get_args(schemas.Decoding.model_fields["mode"].annotation)[0])
    assert set(literal) == set(schemas.MODES) == {"auto", *MODE_NAMES}
    assert BENCH == MODE_NAMES and SPEC_MODES == SPECULATIVE_MODES
