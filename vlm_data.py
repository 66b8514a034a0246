"""Image-text data for the vision-language model: built-in synthetic scenes, LLaVA-style json, hub datasets.

What is here
- A built-in, offline image set drawn with numpy: 1 to 3 shapes (square, circle, triangle) of one colour
  (red, green, blue, yellow) in distinct quadrants of a small noisy canvas. Every caption and every answer
  is known by construction, so accuracy is exact match against the truth, not a judgement call.
  Questions have few possible answers on purpose, so chance is known: colour 1/4, shape 1/3, count 1/3,
  position 1/4 (asked only when there is one shape). The held-out split is drawn from a separate random
  stream (`make_examples(..., split="test")`).
- Two kinds of example, following LLaVA's two stages (Liu et al. 2023, "Visual Instruction Tuning"):
  "caption" rows for stage 1 (align the projector: "<image>Describe the image." -> caption) and "qa" rows
  for stage 2 (instruction tuning: "<image>What colour is the shape?" -> "red").
- Loaders for real data: a LLaVA-pretrain-style json (a list of {"image": relative path, "conversations":
  [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}) next to an image folder,
  and a `datasets` image dataset (an image column and a text column). Pillow decodes; the centre crop,
  resize and normalization are written here (`image_to_tensor`).
- `ExampleStream`: shuffled batches of example indices with an exact-resume position, like TokenStream.

An example is a dict {"image": uint8 array (H, W, 3) | path | PIL image, "messages": [chat turns],
"answer": str (qa rows), "family": str}. The user turn holds the text "<image>" where the picture goes;
vlm.render_with_image turns that into image-token slots.

Write the built-in set to disk (PNG files + LLaVA-format json, readable by any LLaVA tooling):
    python vlm_data.py out_dir=data/vlm
    python train_vlm.py configs/vlm_tiny.yaml caption_data=data/vlm qa_data=data/vlm test_data=data/vlm  # read back

Shape legend: B batch, C channels (3, RGB), S image side in pixels.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from config import UserError, run_cli

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
SHAPES = ("square", "circle", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # quadrant order: row-major
COUNT_WORDS = ("one", "two", "three")
FAMILIES = ("colour", "shape", "count", "position")
QUESTIONS = {
    "colour": ("What colour is the shape?", "Which colour are the shapes?"),
    "shape": ("What shape is it?", "Which shape do you see?"),
    "count": ("How many shapes are there?", "Count the shapes."),
    "position": ("Where is the shape?", "In which corner is the shape?"),
}
CAPTION_PROMPTS = ("Describe the image.", "What is in the picture?")
# Normalize pixels from [0, 1] to [-1, 1]: centred inputs for the patch embedding, the same for every image.
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5


# ----------------------------------------------------------------------------- built-in synthetic scenes


def draw_shape(canvas: np.ndarray, kind: str, cy: float, cx: float, r: float, rgb) -> None:
    """Paint one filled shape of half-size r centred at (cy, cx) onto canvas (S, S, 3) in place."""
    S = canvas.shape[0]
    yy, xx = np.mgrid[0:S, 0:S] + 0.5  # pixel centres
    dy, dx = yy - cy, xx - cx
    if kind == "square":
        inside = (np.abs(dy) <= 0.8 * r) & (np.abs(dx) <= 0.8 * r)  # 0.8: about the same area as the circle
    elif kind == "circle":
        inside = dy**2 + dx**2 <= r**2
    elif kind == "triangle":  # apex up: the half-width grows linearly from 0 at the top to r at the bottom
        t = (dy + r) / (2 * r)
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")
    canvas[inside] = rgb


def make_scene(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, dict]:
    """One random scene: (image uint8 (S, S, 3), attributes {count, shape, colour, quadrants}).

    Shapes sit in distinct quadrants (never overlapping, so the count is always visible); colour and
    background get a little noise so that a model cannot key on exact pixel values.
    """
    count = int(rng.integers(1, 4))
    kind = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    quadrants = sorted(rng.choice(4, size=count, replace=False).tolist())
    background = rng.integers(0, 50)
    image = np.clip(background + rng.normal(0, 8, (size, size, 3)), 0, 255)
    half = size / 2
    for q in quadrants:
        row, col = divmod(q, 2)
        r = rng.uniform(0.25, 0.38) * half  # a shape fills about half to three quarters of its quadrant
        jitter = half / 2 - r  # room left to move the centre without leaving the quadrant
        cy = row * half + half / 2 + rng.uniform(-jitter, jitter)
        cx = col * half + half / 2 + rng.uniform(-jitter, jitter)
        rgb = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 12, 3), 0, 255)
        draw_shape(image, kind, cy, cx, r, rgb)
    return image.astype(np.uint8), {"count": count, "shape": kind, "colour": colour, "quadrants": quadrants}


def caption_of(attrs: dict) -> str:
    if attrs["count"] == 1:
        return f"a {attrs['colour']} {attrs['shape']} at the {POSITIONS[attrs['quadrants'][0]]}"
    return f"{COUNT_WORDS[attrs['count'] - 1]} {attrs['colour']} {attrs['shape']}s"


def answer_of(attrs: dict, family: str) -> str:
    if family == "colour":
        return attrs["colour"]
    if family == "shape":
        return attrs["shape"]
    if family == "count":
        return str(attrs["count"])
    if family == "position":
        if attrs["count"] != 1:
            raise ValueError("position is asked only of one-shape scenes")
        return POSITIONS[attrs["quadrants"][0]]
    raise ValueError(f"unknown question family {family!r}; known: {FAMILIES}")


def make_examples(n: int, kind: str = "qa", split: str = "train", seed: int = 0, size: int = 32,
                  families: tuple[str, ...] = FAMILIES, turns: int = 1) -> list[dict]:  # fmt: skip
    """n built-in examples. kind "caption" (stage 1) or "qa" (stage 2 and evaluation).

    split "train" and "test" draw from different random streams (the held-out set). A qa row asks `turns`
    questions of distinct families in random order, chosen among `families` (position only for one-shape
    scenes), as one multi-turn conversation: several answers per image for one pass of the vision tower, as
    LLaVA's instruction data does. "answer" and "family" describe the first question (what evaluation asks).
    """
    if kind not in ("caption", "qa"):
        raise ValueError(f"kind must be 'caption' or 'qa', not {kind!r}")
    if turns < 1:
        raise ValueError(f"turns must be >= 1, not {turns}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"unknown question families {unknown}; known: {FAMILIES}")
    # Separate streams per split and kind: the test images are never training images (up to noise chance).
    rng = np.random.default_rng([seed, {"train": 0, "test": 1}[split], {"caption": 0, "qa": 1}[kind]])
    rows = []
    while len(rows) < n:
        image, attrs = make_scene(rng, size)
        if kind == "caption":
            prompt, answer, family = CAPTION_PROMPTS[rng.integers(2)], caption_of(attrs), "caption"
        else:
            allowed = [f for f in families if f != "position" or attrs["count"] == 1]
            if not allowed:  # only "position" asked, but this scene has several shapes: draw another
                continue
            asked = [allowed[i] for i in rng.permutation(len(allowed))[:turns]]
            messages = []
            for f in asked:
                messages += [{"role": "user", "content": QUESTIONS[f][rng.integers(2)]},
                             {"role": "assistant", "content": answer_of(attrs, f)}]  # fmt: skip
            messages[0]["content"] = "<image>" + messages[0]["content"]
            rows.append({"image": image, "messages": messages, "answer": messages[1]["content"], "family": asked[0]})
            continue
        messages = [{"role": "user", "content": "<image>" + prompt}, {"role": "assistant", "content": answer}]
        rows.append({"image": image, "messages": messages, "answer": answer, "family": family})
    return rows


# ----------------------------------------------------------------------------- decoding and preprocessing


def load_image(image):
    """A path, PIL image or uint8 array -> uint8 array (H, W, 3). Pillow decodes files (any format it knows)."""
    if isinstance(image, np.ndarray):
        return image
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(f"cannot read image {image}: {e}") from None
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    raise ValueError(f"an image must be a path, a PIL image or a uint8 array, not {type(image).__name__}")


def image_to_tensor(image, size: int) -> torch.Tensor:
    """Any image -> normalized float tensor (3, S, S): centre crop to a square, resize, scale to [-1, 1].

    The centre crop keeps the aspect ratio (CLIP's preprocessing does the same); the resize is bilinear with
    antialiasing, so shrinking a large photo averages pixels rather than skipping them.
    """
    a = load_image(image)
    if a.ndim == 2:  # greyscale array
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"image array must be (H, W, 3), got {a.shape}")
    H, W = a.shape[:2]
    side = min(H, W)
    top, left = (H - side) // 2, (W - side) // 2
    a = a[top : top + side, left : left + side]  # (side, side, 3)
    x = torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255.0  # (3, side, side) in [0, 1]
    if side != size:
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return (x - PIXEL_MEAN) / PIXEL_STD  # (3, S, S)


# ----------------------------------------------------------------------------- LLaVA json and hub datasets

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def load_llava_json(path: str, image_folder: str = "") -> list[dict]:
    """Rows of a LLaVA-style json file -> examples; image paths are relative to image_folder (default: the
    json's folder). Images are decoded later, batch by batch. Bad rows stop with the file and row index."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a json list of rows")
    folder = image_folder or os.path.dirname(os.path.abspath(path))
    rows = []
    for i, row in enumerate(data):
        where = f"{path} row {i}"
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise UserError(f"{where}: needs an 'image' path")
        turns = row.get("conversations")
        if not isinstance(turns, list) or len(turns) < 2:
            raise UserError(f"{where}: needs 'conversations' with at least a human and a gpt turn")
        messages = []
        for t in turns:
            if not isinstance(t, dict) or t.get("from") not in ROLES or not isinstance(t.get("value"), str):
                raise UserError(f"{where}: each turn needs 'from' (human|gpt|system) and a string 'value'")
            messages.append({"role": ROLES[t["from"]], "content": t["value"]})
        text = "".join(m["content"] for m in messages)
        if text.count("<image>") == 0:  # LLaVA rows without the tag put the image before the first turn
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise UserError(f"{where}: no human turn to attach the image to")
            first_user["content"] = "<image>" + first_user["content"]
        elif text.count("<image>") > 1:
            raise UserError(f"{where}: more than one <image>; one image per conversation is supported")
        answer = row.get("answer", messages[-1]["content"] if messages[-1]["role"] == "assistant" else "")
        image = os.path.join(folder, row["image"])
        rows.append({"image": image, "messages": messages, "answer": answer, "family": row.get("family", "all")})
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


class HubRows:
    """A `datasets` image dataset seen as examples, decoded lazily (a big dataset is not held in memory).

    Each row becomes one turn pair: user "<image>" + prompt, assistant = the text column.
    """

    def __init__(self, dataset, image_column: str = "image", text_column: str = "caption",
                 prompt: str = "Describe the image."):  # fmt: skip
        missing = [c for c in (image_column, text_column) if c not in dataset.column_names]
        if missing:
            raise UserError(f"dataset has no column(s) {missing}; it has {dataset.column_names}")
        self.ds, self.image_column, self.text_column, self.prompt = dataset, image_column, text_column, prompt

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        row = self.ds[int(i)]
        text = row[self.text_column]
        text = text[0] if isinstance(text, list) else text  # COCO-style datasets list several captions
        messages = [{"role": "user", "content": "<image>" + self.prompt}, {"role": "assistant", "content": text}]
        return {"image": row[self.image_column], "messages": messages, "answer": text, "family": "caption"}


def load_hub_dataset(name: str, split: str = "train", image_column: str = "image", text_column: str = "caption",
                     prompt: str = "Describe the image.") -> HubRows:  # fmt: skip
    """datasets.load_dataset(name, split=split) as lazily decoded examples (needs the network once)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the datasets library raises many types; all mean "cannot get this dataset"
        raise UserError(f"cannot load dataset {name!r} split {split!r}: {e}") from None
    return HubRows(ds, image_column, text_column, prompt)


# ----------------------------------------------------------------------------- batches with an exact position


class ExampleStream:
    """Batches of example indices: a fresh permutation per epoch (seeded), this rank's stride of it.

    state_dict() is two plain ints, so a resumed run continues with exactly the batch it would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if n < batch_size * world_size:
            raise UserError(f"{n} examples cannot fill one batch of {batch_size} on {world_size} rank(s)")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch, self.pos = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next_indices(self) -> list[int]:
        step = self.batch_size * self.world_size
        if self.pos + step > self.n:  # drop the ragged tail: every batch has the same size
            self.epoch, self.pos = self.epoch + 1, 0
        chunk = self._order()[self.pos : self.pos + step]
        self.pos += step
        return chunk[self.rank :: self.world_size].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.pos = int(d["epoch"]), int(d["pos"])


# ----------------------------------------------------------------------------- the command line


@dataclass
class VLMDataConfig:
    out_dir: str = "data/vlm"  # where images/, captions.json, train.json, test.json and meta.json go
    n_caption: int = 4000  # stage-1 caption rows
    n_train: int = 4000  # stage-2 question/answer rows
    n_test: int = 400  # held-out question/answer rows
    image_size: int = 32  # side of the square canvas in pixels
    turns: int = 1  # questions per training image (multi-turn conversations); test rows always ask one
    seed: int = 0  # seed of the scene generator

    def validate(self) -> list[str]:
        errors = [f"{k} must be > 0" for k in ("n_caption", "n_train", "n_test") if getattr(self, k) <= 0]
        if self.turns < 1:
            errors.append("turns must be >= 1")
        if self.image_size < 16:
            errors.append("image_size must be >= 16")
        return errors


def write_split(rows: list[dict], out_dir: str, name: str) -> str:
    """PNG files under out_dir/images/ and out_dir/NAME.json in LLaVA's conversation format."""
    from PIL import Image

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for i, row in enumerate(rows):
        rel = os.path.join("images", f"{name}_{i:05d}.png")
        Image.fromarray(row["image"]).save(os.path.join(out_dir, rel))
        turns = [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in row["messages"]]
        records.append(
            {"id": f"{name}_{i:05d}", "image": rel, "conversations": turns, "answer": row["answer"],
             "family": row["family"]}
        )  # fmt: skip
    path = os.path.join(out_dir, f"{name}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(records, fh, indent=1)
    os.replace(path + ".tmp", path)
    return path


def main(cfg: VLMDataConfig) -> dict:
    size = cfg.image_size
    splits = {
        "captions": make_examples(cfg.n_caption, "caption", "train", cfg.seed, size),
        "train": make_examples(cfg.n_train, "qa", "train", cfg.seed, size, turns=cfg.turns),
        "test": make_examples(cfg.n_test, "qa", "test", cfg.seed, size),
    }
    for name, rows in splits.items():
        print(f"wrote {write_split(rows, cfg.out_dir, name)} ({len(rows)} rows)")
    meta = {"image_size": size, "seed": cfg.seed, "counts": {k: len(v) for k, v in splits.items()},
            "families": list(FAMILIES), "colours": list(COLOURS), "shapes": list(SHAPES)}  # fmt: skip
    with open(os.path.join(cfg.out_dir, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1)
    return meta


if __name__ == "__main__":
    run_cli(main, VLMDataConfig, __doc__)
