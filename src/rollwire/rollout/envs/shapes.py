"""`shapes`: pictures of coloured shapes, one new picture and one question per turn."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

from rollwire.messages import ImagePart, Message, TextPart
from rollwire.rollout.env import EnvStep, Observation

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
KINDS = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    colour: str
    count: int


def draw_scene(rng: random.Random, size: tuple[int, int]) -> Scene:
    """A white canvas with 1-5 shapes; the question is how many shapes have `colour`."""
    w, h = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    colours = [rng.choice(list(COLOURS)) for _ in range(rng.randint(1, 5))]
    for colour in colours:
        r = rng.randint(max(4, min(w, h) // 12), max(5, min(w, h) // 6))
        x, y = rng.randint(r, w - r), rng.randint(r, h - r)
        kind = rng.choice(KINDS)
        fill = COLOURS[colour]
        if kind == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif kind == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        else:
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    asked = rng.choice(colours)
    return Scene(image, asked, colours.count(asked))


def answered_count(text: str) -> int | None:
    """The first number in the answer, as digits or a word."""
    match = re.search(r"\d+|" + "|".join(NUMBER_WORDS), text.lower())
    if match is None:
        return None
    token = match.group(0)
    return int(token) if token.isdigit() else NUMBER_WORDS.index(token)


class ShapesEnv:
    """Several turns; each turn shows a new picture and asks to count shapes of one colour.

    Reward per turn: 1 for the right count, else 0. Done after `turns` answers.
    """

    name = "shapes"

    def __init__(self, turns: int = 3, size: tuple[int, int] = (112, 84)) -> None:
        self.turns = turns
        self.size = size
        self._rng = random.Random(0)
        self._scene: Scene | None = None
        self._turn = 0

    def _ask(self) -> Message:
        self._scene = draw_scene(self._rng, self.size)
        question = f"How many {self._scene.colour} shapes are in this picture? Answer with a number."
        return Message(role="user", content=(ImagePart(self._scene.image), TextPart(question)))

    async def reset(self, seed: int) -> Observation:
        self._rng = random.Random(seed)
        self._turn = 0
        system = Message(role="system", content="You count shapes in pictures.")
        return Observation(messages=[system, self._ask()], info={"seed": seed})

    async def step(self, message: Message) -> EnvStep:
        assert self._scene is not None, "reset first"
        correct = answered_count(message.text) == self._scene.count
        self._turn += 1
        info = {"turn": self._turn, "expected": self._scene.count, "correct": correct}
        if self._turn >= self.turns:
            return EnvStep(reward=float(correct), done=True, info=info)
        return EnvStep(messages=[self._ask()], reward=float(correct), info=info)
