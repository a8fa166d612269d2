"""Similarity baselines (docs/evaluation.md#baselines): mean and largest cosine similarity per group."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_guda import GroupedDataset
from diffusers_guda.errors import ConfigError, DataError
from guda_lab.evaluation.similarity import nearest_neighbour_scores, similarity_scores


def test_similarity_copy_of_training_image_scores_its_group_highest(tiny_dataset):
    queries = tiny_dataset.images[[0, 12, 24]]  # one image of each group
    scores = similarity_scores(queries, tiny_dataset)
    assert scores.shape == (3, 3) and scores.dtype == torch.float64
    assert scores.argmax(1).tolist() == [0, 1, 2]


def test_similarity_equals_hand_computation():
    images = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, -0.5, 0.0], [0.0, 1.0, 0.0, 0.0], [-1.0, 0.2, 0.3, 0.9], [0.1, 0.1, 0.9, -0.4]]
    ).view(5, 1, 2, 2)
    dataset = GroupedDataset(images, torch.tensor([0, 0, 1, 1, 1]), ["a", "b"])
    queries = torch.tensor([[0.3, -0.2, 0.8, 0.1], [-0.6, 0.9, 0.0, 0.4]]).view(2, 1, 2, 2)
    q = queries.view(2, -1).numpy().astype(np.float64)
    x = images.view(5, -1).numpy().astype(np.float64)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T
    expected = np.stack([cos[:, :2].mean(1), cos[:, 2:].mean(1)], axis=1)
    np.testing.assert_allclose(similarity_scores(queries, dataset).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(
        nearest_neighbour_scores(queries, dataset).numpy(), np.stack([cos[:, :2].max(1), cos[:, 2:].max(1)], axis=1), atol=1e-6
    )


def test_similarity_uses_feature_fn(tiny_dataset):
    queries = tiny_dataset.images[[0, 30]]
    constant = similarity_scores(queries, tiny_dataset, feature_fn=lambda x: torch.ones(len(x), 4))
    assert torch.allclose(constant, torch.ones_like(constant))
    calls = []

    def column_means(x):
        calls.append(len(x))
        return x.mean(dim=(1, 2))  # [B, W]: column profile, where the bars are

    scores = similarity_scores(queries, tiny_dataset, feature_fn=column_means, batch_size=10)
    assert calls and max(calls) <= 10
    assert scores.argmax(1).tolist() == [0, 2]
    assert not torch.allclose(scores, similarity_scores(queries, tiny_dataset))


def test_similarity_independent_of_batch_size(tiny_dataset):
    queries = tiny_dataset.images[[1, 13, 25]] * 0.7
    reference = similarity_scores(queries, tiny_dataset, batch_size=256)
    for batch_size in (1, 5, 17):
        assert torch.allclose(similarity_scores(queries, tiny_dataset, batch_size=batch_size), reference, atol=1e-12)
    assert torch.allclose(
        nearest_neighbour_scores(queries, tiny_dataset, batch_size=4), nearest_neighbour_scores(queries, tiny_dataset), atol=1e-12
    )


def test_similarity_shape_errors(tiny_dataset):
    with pytest.raises(DataError, match="shape"):
        similarity_scores(torch.zeros(2, 3, 8, 8), tiny_dataset)
    with pytest.raises(DataError, match="shape"):
        similarity_scores(torch.zeros(1, 8, 8), tiny_dataset)
    with pytest.raises(ConfigError, match="2-D"):
        similarity_scores(tiny_dataset.images[:1], tiny_dataset, feature_fn=lambda x: x)
    with pytest.raises(ConfigError, match="one row per image"):
        similarity_scores(tiny_dataset.images[:1], tiny_dataset, feature_fn=lambda x: torch.ones(3, 2))


def test_nearest_neighbour_exact_copy_is_one(tiny_dataset):
    scores = nearest_neighbour_scores(tiny_dataset.images[[5, 20]], tiny_dataset)
    assert scores[0, 0].item() == pytest.approx(1.0, abs=1e-12)
    assert scores[1, 1].item() == pytest.approx(1.0, abs=1e-12)
    assert (scores[0, 1:] < 1 - 1e-6).all() and scores.argmax(1).tolist() == [0, 1]
