"""Group attribution on the embedded digits with the Python API, step by step.

    python examples/attribute_digits.py --out runs/digits

1. train a small DDPM on scikit-learn's handwritten digits (groups = the 10 digits);
2. unlearn each digit into its own LoRA adapter (one bundle);
3. generate images with fixed seeds and ask which digit group made each one.
"""

import argparse

import torch

from diffusers_guda import GUDADDPMPipeline, Recipe, load_digits
from guda_lab import train_base_model, training_config

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="runs/digits")
parser.add_argument("--num-images", type=int, default=8)
args = parser.parse_args()

dataset = load_digits()

# 1. The base model is a stock diffusers DDPMPipeline directory, trained by the lab's toy recipe
#    (the train section of adapters/digits-ddpm.json).
train_base_model(dataset, training_config(Recipe.load("digits-ddpm"), "example"), output_dir=f"{args.out}/base")

# 2. GUDADDPMPipeline loads it like DDPMPipeline and adds unlearning and attribution; unlearn_groups
#    uses the recipe of its family (digits-ddpm) and records its ELBO settings in the bundle.
pipe = GUDADDPMPipeline.from_pretrained(f"{args.out}/base")
bundle = pipe.unlearn_groups(dataset)
bundle.save_pretrained(f"{args.out}/bundle")

# 3. Generation is DDPMPipeline's own; the adapters stay off while it runs.
generator = torch.Generator().manual_seed(0)
images = pipe(batch_size=args.num_images, generator=generator, output_type="np").images
result = pipe.attribute(images)  # scored with the bundle's ELBO settings
for i, ranking in enumerate(result.top(3)):
    print(f"image {i}: " + ", ".join(f"digit {g} ({score:+.2f} nats)" for g, score in ranking))
result.plot(f"{args.out}/attribution.png", images=torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1)
