import pytest

from rollwire.errors import PlaceholderError
from rollwire.render import ImageRef, expected_length, validate_placeholders

PAD = 9


def stream() -> tuple[list[int], list[ImageRef]]:
    # text, 4 pads (grid 1x4x4), text, 12 pads (grid 1x6x8), text
    ids = [1, 2] + [PAD] * 4 + [3] + [PAD] * 12 + [4]
    return ids, [ImageRef("a", 2, 4, (1, 4, 4)), ImageRef("b", 7, 12, (1, 6, 8))]


def test_expected_length_is_grid_over_merge_squared() -> None:
    assert expected_length((1, 4, 4), 2) == 4
    assert expected_length((1, 6, 8), 2) == 12
    assert expected_length((1, 74, 74), 2) == 1369


def test_valid_stream_passes() -> None:
    ids, refs = stream()
    validate_placeholders(ids, refs, pad_id=PAD, merge_size=2, known_ids={"a", "b"})


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda ids, refs: (ids, [refs[0], ImageRef("b", 7, 11, (1, 6, 8))]), "range length 11 but grid"),
        (lambda ids, refs: (ids, [refs[0], ImageRef("b", 7, 12, (1, 6, 6))]), "range length 12 but grid"),
        (lambda ids, refs: (ids, [refs[0], ImageRef("b", 6, 12, (1, 6, 8))]), "not the image pad token"),
        (lambda ids, refs: (ids, [refs[0]]), "12 image pad token(s) stand outside every image range (first at 7)"),
        (lambda ids, refs: (ids, [refs[1], refs[0]]), "overlaps or precedes"),
        (lambda ids, refs: (ids[:10], refs), "outside the 10 tokens"),
        (lambda ids, refs: ([*ids, PAD], refs), "stand outside every image range (first at 20)"),
        (lambda ids, refs: ([*ids[:6], PAD, *ids[7:]], refs), "pad run around"),
        (lambda ids, refs: (ids, [refs[0], ImageRef("c", 7, 12, (1, 6, 8))]), "unknown image id 'c'"),
    ],
)
def test_each_broken_invariant_is_caught(mutate, needle) -> None:  # type: ignore[no-untyped-def]
    ids, refs = mutate(*stream())
    with pytest.raises(PlaceholderError) as info:
        validate_placeholders(ids, refs, pad_id=PAD, merge_size=2, known_ids={"a", "b"})
    assert needle in str(info.value)
