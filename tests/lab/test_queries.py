"""Query images: generated with fixed seeds (query i from seed + i, whatever the batch), saved as PNG,
loaded back as model images; prompts cycled; judged by a pixel nearest-neighbour classifier."""

from __future__ import annotations

import torch
from diffusers import DDPMPipeline

from diffusers_guda import GroupedDataset
from guda_lab.queries import digit_classifier, generate_queries, load_query_images, query_prompts


def test_query_i_comes_from_seed_plus_i_whatever_the_batch(stock_pipeline_dir, tmp_path):
    pipe = DDPMPipeline.from_pretrained(stock_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    batched = generate_queries(pipe, 3, seed=5, num_inference_steps=2, out_dir=tmp_path / "a", batch_size=2)
    assert [p.name for p in batched] == ["query_0000.png", "query_0001.png", "query_0002.png"]
    assert all(p.parent == tmp_path / "a" and p.is_file() for p in batched)
    alone = generate_queries(pipe, 3, seed=5, num_inference_steps=2, out_dir=tmp_path / "b", batch_size=1)
    assert [p.read_bytes() for p in batched] == [p.read_bytes() for p in alone]
    later = generate_queries(pipe, 2, seed=6, num_inference_steps=2, out_dir=tmp_path / "c")
    assert later[0].read_bytes() == batched[1].read_bytes()  # seed 6 is query 1 of seed 5
    assert batched[0].read_bytes() != batched[1].read_bytes()

    images = load_query_images(batched)
    assert images.shape == (3, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images[1:2], load_query_images(later[:1]))


def test_query_prompts_cycle_the_distinct_prompts_in_sorted_order():
    dataset = GroupedDataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 0, 1, 1]), ["a", "b"], ["b x", "a x", "b x", "c x"])
    assert query_prompts(dataset, 5) == ["a x", "b x", "c x", "a x", "b x"]


def test_digit_classifier_names_the_group_of_an_image(tiny_dataset):
    classifier = digit_classifier(tiny_dataset)
    predicted = classifier.predict(tiny_dataset.images.flatten(1).numpy())
    assert (predicted == tiny_dataset.group_ids.numpy()).all()  # three well separated bar positions
