"""Entropy coding: lossless round trips, rates close to the model's ideal, better than zlib/lzma,
and probability tables built exactly (the same on every machine)."""
import numpy as np
import pytest

from kanimg.compress.entropy import (COMPACT_CODES, GAUSSIAN, LAPLACE, StreamModel, cost_bits, decode_streams,
                                     encode_streams, fit_model, general_purpose_sizes, probability_table)
from kanimg.errors import KanimgError


def streams(seed=0):
    rng = np.random.default_rng(seed)
    return [
        (np.clip(np.round(rng.laplace(0, 4, 3000)), -127, 127).astype(np.int64), 127),
        (np.clip(np.round(rng.normal(-7, 60, 2000)), -2047, 2047).astype(np.int64), 2047),
        (np.zeros(50, dtype=np.int64), 7),
        (np.zeros(0, dtype=np.int64), 31),
        (np.array([-15, 15, 0, 15]), 15),  # the ends of the alphabet
    ]


def test_round_trip_is_lossless_and_close_to_the_ideal_rate():
    data = streams()
    models = [fit_model(s, limit) for s, limit in data]
    payload = encode_streams([s for s, _ in data], [l for _, l in data], models)
    decoded = decode_streams(payload, [s.size for s, _ in data], [l for _, l in data], models)
    for (s, _), d in zip(data, decoded):
        assert np.array_equal(s, d)
    ideal = sum(cost_bits(s, m, l) for (s, l), m in zip(data, models)) / 8
    assert len(payload) <= ideal * 1.01 + 8  # range coder overhead: < 1 % and a final word


def test_fitted_family_matches_the_data():
    rng = np.random.default_rng(1)
    laplace = np.round(rng.laplace(0, 6, 20000)).astype(np.int64)
    gauss = np.round(rng.normal(0, 6, 20000)).astype(np.int64)
    assert fit_model(laplace, 255).family == LAPLACE
    assert fit_model(gauss, 255).family == GAUSSIAN
    assert fit_model(gauss + 9, 255).centre == 9


def test_beats_general_purpose_compressors_on_quantised_weights():
    rng = np.random.default_rng(2)
    ints = np.clip(np.round(rng.laplace(0, 3, 8000)), -127, 127).astype(np.int64)
    payload = encode_streams([ints], [127], [fit_model(ints, 127)])
    assert len(payload) < min(general_purpose_sizes([ints]).values())


def test_probability_tables_are_exact_integers():
    table = probability_table(StreamModel(LAPLACE, 0, 0), 3)  # θ = 1/2
    assert list(table) == [2.0**49, 2.0**50, 2.0**51, 2.0**52, 2.0**51, 2.0**50, 2.0**49]
    wide = probability_table(StreamModel(GAUSSIAN, 5, 40000), 2047)
    assert np.all(wide == np.floor(wide)) and wide.argmax() == 5 + 2047
    assert StreamModel(LAPLACE, 0, 2047).theta == pytest.approx(1 / 4096)  # the most peaked code


def test_every_compact_byte_is_a_distinct_model_and_writes_back_to_itself():
    models = [StreamModel.from_compact_byte(b) for b in range(256)]
    assert all(m.compact and m.centre == 0 and m.compact_byte() == b for b, m in enumerate(models))
    assert len({(m.family, m.code) for m in models}) == 256
    thetas = [m.theta for m in models[:128]]
    assert all(a < b for a, b in zip(thetas, thetas[1:]))  # 1 - θ falls with the index
    assert thetas[0] == 1 / 4096 and thetas[71] == 0.5 and 1 - thetas[-1] == 2.0**-8  # the spec's ends
    assert not StreamModel(LAPLACE, 1, int(COMPACT_CODES[5])).compact and not StreamModel(LAPLACE, 0, 1).compact


@pytest.mark.parametrize("family, scale", [(f, s) for f in ("laplace", "normal") for s in (0.01, 0.1, 0.5, 2, 8)] + [("laplace", 100)])
def test_a_compact_fit_codes_within_a_fraction_of_a_percent_of_the_free_fit(family, scale):
    """One byte per model instead of three: over the scales the compact table spans (a Laplace
    up to ~250, a Gaussian up to ~11), the coarser θ costs far less than the 16 bits it saves."""
    values = np.round(getattr(np.random.default_rng(3), family)(0, scale, 5000)).astype(np.int64)
    limit = max(1, int(np.abs(values).max()))
    free, compact = fit_model(values, limit), fit_model(values, limit, compact=True)
    assert compact.compact and compact.family == free.family
    assert cost_bits(values, compact, limit) <= 1.002 * cost_bits(values, free, limit) + 4


@pytest.mark.parametrize("seed", range(6))
def test_a_compact_fit_is_the_compact_model_that_codes_its_stream_in_the_fewest_bits(seed):
    """Checked against every one of the 256 one-byte models costed one by one, on the small
    skewed, sparse and wide streams a latent grid's sets are."""
    rng = np.random.default_rng(seed)
    values = [np.round(rng.laplace(0, 0.3, 400)), np.round(rng.normal(0, 2.5, 300)),
              np.where(rng.random(500) < 0.03, rng.integers(-3, 4, 500), 0), np.round(rng.laplace(0.6, 1.5, 60)),
              rng.integers(-12, 13, 40)][seed % 5].astype(np.int64)
    limit = max(1, int(np.abs(values).max()) + seed)
    every = [cost_bits(values, StreamModel.from_compact_byte(b), limit) for b in range(256)]
    fitted = fit_model(values, limit, compact=True)
    assert fitted.compact and cost_bits(values, fitted, limit) == pytest.approx(min(every), rel=1e-12)


def test_malformed_models_and_payloads_are_refused():
    with pytest.raises(KanimgError, match="entropy model"):
        StreamModel(2, 0, 0)
    with pytest.raises(KanimgError, match="centre"):
        probability_table(StreamModel(LAPLACE, 9, 0), 3)
    with pytest.raises(KanimgError, match="32-bit"):
        decode_streams(b"abc", [1], [3], [StreamModel(LAPLACE, 0, 0)])


def test_a_payload_the_coder_cannot_decode_is_one_line():
    from kanimg.compress.entropy import StreamDecoder

    with pytest.raises(KanimgError) as info:
        StreamDecoder(b"\x00" * 8).decode(3, 0, StreamModel(0, 0, 100))  # a one-symbol alphabet
    assert "\n" not in str(info.value)
