import copy
import math

import pytest
import torch

from hero_ml.encoder import FeedbackEncoder, TripletSource, cosine_distance, train_encoder, triplet_loss
from hero_ml.rewards import similarity_to_best


def test_cosine_distance_is_per_sample() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 2.0]])
    b = torch.tensor([[0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])
    assert cosine_distance(a, b).tolist() == pytest.approx([0.5, 1.0, 0.0], abs=1e-7)


def test_triplet_loss_on_a_hand_computed_case() -> None:
    anchor = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    positive = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # d = 0, 0.5
    negative = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # d = 0.5, (1 - 1/sqrt 2) / 2
    expected = (max(0.0, 0 - 0.5 + 0.5) + (0.5 - (1 - 1 / math.sqrt(2)) / 2 + 0.5)) / 2
    assert triplet_loss(anchor, positive, negative, margin=0.5).item() == pytest.approx(expected)


def test_encoder_is_the_reference_network_on_sd15_latents() -> None:
    encoder = FeedbackEncoder((4, 64, 64))
    linear = [m for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [
        (2048, 2048),
        (2048, 2048),
        (2048, 1024),
        (1024, 512),
    ]
    conv = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in conv] == [
        (4, 8, (3, 3)),
        (8, 16, (3, 3)),
        (16, 32, (3, 3)),
    ]
    latents = torch.randn(2, 4, 64, 64)
    assert encoder.features(latents).shape == (2, 2048) and encoder(latents).shape == (2, 512)
    # the layers in the reference's order: conv, ReLU, pool x3, then fc1 with its ReLU (whose
    # non-negative output is the reward's representation), then the head with ReLUs between its layers
    kinds = [type(m).__name__ for m in [*encoder.cnn, *encoder.head]]
    assert kinds == [
        *["Conv2d", "ReLU", "MaxPool2d"] * 3,
        *["Flatten", "Linear", "ReLU"],
        *["Linear", "ReLU", "Linear", "ReLU", "Linear"],
    ]


def test_encoder_sizes_itself_from_the_toy_latent_and_refuses_odd_shapes() -> None:
    encoder = FeedbackEncoder((4, 16, 16))
    assert encoder(torch.randn(3, 4, 16, 16)).shape == (3, 32)
    with pytest.raises(ValueError, match="multiples of 8, got 12x16"):
        FeedbackEncoder((4, 12, 16))


def separable_round(gen: torch.Generator) -> TripletSource:
    """Good latents share the best's pattern, bad ones carry its opposite, both under noise."""
    pattern = torch.randn(4, 16, 16, generator=gen)
    good = pattern + 0.8 * torch.randn(8, 4, 16, 16, generator=gen)
    bad = -pattern + 0.8 * torch.randn(8, 4, 16, 16, generator=gen)
    return TripletSource(anchor=pattern, good=good, bad=bad)


def trained(seed: int, epochs: int = 60) -> tuple[FeedbackEncoder, list[float], TripletSource]:
    torch.manual_seed(seed)
    encoder = FeedbackEncoder((4, 16, 16))
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    source = separable_round(torch.Generator().manual_seed(seed))
    losses = train_encoder(
        encoder,
        optimizer,
        [source],
        epochs=epochs,
        triplets_per_epoch=32,
        margin=0.5,
        generator=torch.Generator().manual_seed(seed),
    )
    return encoder, losses, source


def test_training_separates_good_from_bad_and_is_reproducible() -> None:
    encoder, losses, source = trained(0)
    assert len(losses) == 60 and sum(losses[-10:]) < 0.5 * sum(losses[:10])
    with torch.no_grad():
        best = encoder.features(source.anchor[None])[0]
        good = similarity_to_best(encoder.features(source.good), best)
        bad = similarity_to_best(encoder.features(source.bad), best)
    assert good.min() > bad.max()
    assert trained(0, epochs=5)[1] == trained(0, epochs=5)[1]


def test_rounds_without_bad_images_give_no_triplets_and_without_good_use_the_anchor() -> None:
    encoder = FeedbackEncoder((4, 16, 16))
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    source = separable_round(torch.Generator().manual_seed(0))
    kwargs = dict(epochs=3, triplets_per_epoch=4, margin=0.5, generator=torch.Generator())
    seen: list[tuple[int, int]] = []
    no_bad = TripletSource(anchor=source.anchor, good=source.good, bad=source.bad[:0])
    assert train_encoder(encoder, optimizer, [no_bad], **kwargs, on_epoch=lambda *p: seen.append(p)) == []
    assert seen == []  # nothing to train: no progress to show
    no_good = TripletSource(anchor=source.anchor, good=source.good[:0], bad=source.bad)
    assert (
        len(train_encoder(encoder, optimizer, [no_good], **kwargs, on_epoch=lambda *p: seen.append(p))) == 3
    )
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]
    # the anchor as its own positive (distance 0): each triplet's loss is relu(margin - d(a, n))
    one_bad = TripletSource(anchor=source.anchor, good=source.good[:0], bad=source.bad[:1])
    still = torch.optim.SGD(encoder.parameters(), lr=0.0)  # the encoder as it is, every epoch
    losses = train_encoder(encoder, still, [one_bad], **kwargs)
    with torch.no_grad():
        d = cosine_distance(encoder(source.anchor[None]), encoder(source.bad[:1])).item()
    assert 0 < d < 0.5 and losses == pytest.approx([0.5 - d] * 3, abs=1e-6)


def test_an_epoch_embeds_each_latent_once_with_the_gradient_of_every_triplet_row() -> None:
    torch.manual_seed(0)
    shape = (4, 8, 8)
    source = TripletSource(anchor=torch.randn(shape), good=torch.randn(3, *shape), bad=torch.randn(4, *shape))
    encoder = FeedbackEncoder(shape)
    reference = copy.deepcopy(encoder)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=1.0)  # the step is minus the gradient
    kwargs = {"epochs": 1, "triplets_per_epoch": 16, "margin": 0.5}
    train_encoder(encoder, optimizer, [source], generator=torch.Generator().manual_seed(3), **kwargs)

    draws = torch.Generator().manual_seed(3)  # the same triplets, every row embedded
    torch.randint(1, (16,), generator=draws)  # which source: there is one
    positive = source.good[torch.randint(3, (16,), generator=draws)]
    negative = source.bad[torch.randint(4, (16,), generator=draws)]
    anchor = source.anchor.expand(16, *shape)
    triplet_loss(*reference(torch.cat([anchor, positive, negative])).chunk(3), margin=0.5).backward()
    for trained, start in zip(encoder.parameters(), reference.parameters(), strict=True):
        assert start.grad is not None
        torch.testing.assert_close(trained, start - start.grad, rtol=1e-5, atol=1e-6)


def test_several_rounds_draw_each_triplet_from_one_round_and_skip_rounds_without_bad_images() -> None:
    # replay: the rounds' latents share one table; a wrong offset would pair one round's anchor with
    # another round's images. The step must be that of the triplets drawn round by round.
    torch.manual_seed(0)
    shape = (4, 8, 8)
    first = TripletSource(anchor=torch.randn(shape), good=torch.randn(3, *shape), bad=torch.randn(2, *shape))
    no_bad = TripletSource(anchor=torch.randn(shape), good=torch.randn(2, *shape), bad=torch.empty(0, *shape))
    no_good = TripletSource(
        anchor=torch.randn(shape), good=torch.empty(0, *shape), bad=torch.randn(3, *shape)
    )
    encoder = FeedbackEncoder(shape)
    reference = copy.deepcopy(encoder)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=1.0)
    kwargs = {"epochs": 1, "triplets_per_epoch": 24, "margin": 0.5}
    sources = [first, no_bad, no_good]
    train_encoder(encoder, optimizer, sources, generator=torch.Generator().manual_seed(5), **kwargs)

    draws = torch.Generator().manual_seed(5)
    which = torch.randint(2, (24,), generator=draws)  # of the two rounds with a bad image
    anchors, positives, negatives = [], [], []
    for index, source in enumerate([first, no_good]):
        count = int((which == index).sum())
        assert count > 0  # both rounds drawn: the case tests the offsets of both
        pool = source.good if len(source.good) else source.anchor[None]  # no good: the anchor itself
        anchors.append(source.anchor.expand(count, *shape))
        positives.append(pool[torch.randint(len(pool), (count,), generator=draws)])
        negatives.append(source.bad[torch.randint(len(source.bad), (count,), generator=draws)])
    rows = torch.cat([torch.cat(anchors), torch.cat(positives), torch.cat(negatives)])
    triplet_loss(*reference(rows).chunk(3), margin=0.5).backward()
    for trained, start in zip(encoder.parameters(), reference.parameters(), strict=True):
        assert start.grad is not None
        torch.testing.assert_close(trained, start - start.grad, rtol=1e-5, atol=1e-6)
