"""`mllm data photos OUT`: a real-photo question set from the photos the installed packages ship.

scikit-image, gradio and matplotlib ship a few real photos (a cat, a cup of espresso, cheetahs, a lion, a
moped, an astronaut, ...). None is ever trained on. Each becomes one question, "What is in this picture?",
with the classifier-level truth beside it: `accept`, the ImageNet class names (and plain words) that count
as naming it, or, where ImageNet has no class for what the photo shows (a person, the moon, a rocket on its
pad: the classifier's top class is wrong), `unsure`: then a right answer says it is not sure rather than
naming something confidently. `mllm eval --data OUT/photos.json` answers and scores them (`photo_correct`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from importlib import resources
from pathlib import Path

# (package, path in it) -> accepted names; an empty tuple: no ImageNet class fits, the answer must be unsure.
PHOTOS: dict[tuple[str, str], tuple[str, ...]] = {
    ("skimage", "data/astronaut.png"): (),  # a person in a space suit: ImageNet has no person
    ("skimage", "data/camera.png"): ("tripod", "camera"),  # a cameraman behind a camera on a tripod
    ("skimage", "data/chelsea.png"): ("cat", "Egyptian Mau", "tabby cat", "tiger cat"),
    ("skimage", "data/coffee.png"): ("espresso", "cup", "coffee mug"),
    ("skimage", "data/coins.png"): (),  # old coins: no ImageNet class
    ("skimage", "data/horse.png"): ("horse", "sorrel"),  # a black silhouette
    ("skimage", "data/hubble_deep_field.jpg"): (),
    ("skimage", "data/moon.png"): (),
    ("skimage", "data/motorcycle_left.png"): ("moped", "scooter", "motorcycle", "motor scooter"),
    ("skimage", "data/motorcycle_right.png"): ("moped", "scooter", "motorcycle", "motor scooter"),
    ("skimage", "data/retina.jpg"): (),
    ("skimage", "data/rocket.jpg"): ("missile", "projectile", "space shuttle"),
    ("skimage", "data/page.png"): (),  # a scanned page of text
    ("gradio", "media_assets/images/cheetah.jpg"): ("cheetah",),
    ("gradio", "media_assets/images/cheetah1.jpg"): ("cheetah",),
    ("gradio", "media_assets/images/lion.jpg"): ("lion",),
    ("gradio", "media_assets/images/bus.png"): ("bus", "school bus", "minibus", "trolleybus"),
    ("gradio", "media_assets/images/tower.jpg"): (),  # the Eiffel Tower: no ImageNet class
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"): ("military uniform", "suit", "uniform"),
}
QUESTION = "What is in this picture?"
UNSURE_WORDS = ("not sure", "best guesses")


def photo_correct(prediction: str, row: dict) -> bool:
    """Right when the answer names one of the photo's `accept` names, or says it is not sure: what fails is a
    confident answer naming something else (or a shapes-world description of a photo)."""
    text = prediction.lower()
    return any(name.lower() in text for name in row.get("accept", ())) or any(w in text for w in UNSURE_WORDS)


def write_question_set(out: Path) -> Path:
    """OUT/images/<the photos> and OUT/photos.json (LLaVA rows with `type` photo and `accept` / `unsure`)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for (package, inner), accept in PHOTOS.items():
        try:
            source = resources.files(package) / inner
        except ModuleNotFoundError as e:
            raise FileNotFoundError(f"{package} is not installed; install the project's dependencies") from e
        name = f"{package}-{Path(inner).name}"
        with resources.as_file(source) as path:
            shutil.copyfile(path, out / "images" / name)
        reference = accept[0] if accept else "I am not sure."
        row = {"id": Path(name).stem, "image": name, "type": "photo", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": reference}]}  # fmt: skip
        row.update({"accept": list(accept)} if accept else {"unsure": True})
        rows.append(row)
    path = out / "photos.json"
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mllm data photos", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for photos.json and images/")
    args = p.parse_args(argv)
    path = write_question_set(Path(args.out))
    print(
        f"wrote {path} ({len(PHOTOS)} photos); score with: mllm eval --data {path} --image-folder {path.parent}/images"
    )
    return 0
