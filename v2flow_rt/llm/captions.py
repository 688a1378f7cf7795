"""Captions for the built-in training photos, and the crops they describe (numpy only).

``SUBJECTS`` maps a subject to its photos and a few paraphrased captions; the text-to-image LM is trained
on (caption, crop) pairs and its prompt conditioning is measured against each subject's crops.
"""

from __future__ import annotations

import numpy as np

from ..data import CropSampler, load_photo

# subject -> (built-in photos, captions). The two motorcycle photos are a stereo pair of one scene, so
# they are one subject; every other training photo is its own.
SUBJECTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "astronaut": (("astronaut",), ("a photo of an astronaut", "an astronaut in a white space suit",
                                   "portrait of an astronaut with a flag")),
    "coffee": (("coffee",), ("a cup of coffee", "a coffee cup on a saucer", "a hot drink in a white cup")),
    "rocket": (("rocket",), ("a rocket on the launch pad", "a space shuttle ready for launch",
                             "a rocket under a blue sky")),
    "motorcycle": (("motorcycle_left", "motorcycle_right"), ("a red motorcycle", "a motorcycle parked indoors",
                                                             "a photo of a motorbike")),
    "hubble_deep_field": (("hubble_deep_field",), ("deep space full of galaxies", "the hubble deep field",
                                                   "distant galaxies in the night sky")),
    "retina": (("retina",), ("a photo of a retina", "the back of an eye", "a fundus image of the retina")),
    "ihc": (("ihc",), ("a microscope slide of tissue", "stained cells under a microscope",
                       "immunohistochemistry of tissue")),
    "camera": (("camera",), ("a black and white photo of a cameraman", "a man with a camera on a tripod",
                             "an old grayscale photograph of a photographer")),
    "brick": (("brick",), ("a brick wall", "a texture of grey bricks", "bricks and mortar")),
    "grass": (("grass",), ("a patch of grass", "grass texture in black and white", "blades of grass")),
    "gravel": (("gravel",), ("gravel on the ground", "a texture of small stones", "a close up of pebbles")),
    "china": (("china",), ("a chinese temple", "a pagoda among trees", "a traditional building in china")),
    "flower": (("flower",), ("a field of flowers", "a pink flower close up", "a flower in bloom")),
}



def subject_crops(subjects: dict[str, tuple[tuple[str, ...], tuple[str, ...]]], size: int, per_subject: int,
                  seed: int, scales: tuple[float, ...] = (1.0, 0.5, 0.25)) -> dict[str, np.ndarray]:
    """Each subject's random crops (flipped at random): float32 [per_subject, 3, size, size]."""
    rng = np.random.default_rng(seed)
    return {name: CropSampler([load_photo(p) for p in photos], size, scales, flip=True).sample(per_subject, rng)
            for name, (photos, _) in subjects.items()}
