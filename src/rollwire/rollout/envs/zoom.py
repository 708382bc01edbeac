"""`zoom`: read a small number in a picture by calling a `crop` tool that returns the crop as an image."""

from __future__ import annotations

import random
import re
from typing import Annotated

import pydantic
from PIL import Image, ImageDraw

from rollwire.errors import ToolError
from rollwire.messages import ImagePart, Message, TextPart
from rollwire.rollout.env import EnvStep, Observation
from rollwire.tools import run_tool_calls, tool

ANSWER = re.compile(r"ANSWER:\s*(\d+)")


class ZoomEnv:
    """The picture holds a small 3-digit number among distractors. The model may call `crop`
    (the tool message returns the cropped image) and ends with `ANSWER: <number>`.

    Malformed or unknown tool calls get an error message back; a turn with neither a tool call
    nor an answer gets a reminder. Reward 1 for the right number, else 0.
    """

    name = "zoom"

    def __init__(self, size: tuple[int, int] = (168, 112), max_reminders: int = 3) -> None:
        self.size = size
        self.max_reminders = max_reminders
        self._image: Image.Image | None = None
        self._number = 0
        self._reminders = 0

    def _draw(self, rng: random.Random) -> Image.Image:
        w, h = self.size
        image = Image.new("RGB", self.size, (245, 245, 240))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.randint(0, w - 10), rng.randint(0, h - 10)
            draw.rectangle((x, y, x + rng.randint(4, 20), y + rng.randint(4, 20)),
                           fill=tuple(rng.randint(120, 230) for _ in range(3)))
        self._number = rng.randint(100, 999)
        draw.text((rng.randint(2, w - 24), rng.randint(2, h - 12)), str(self._number), fill=(20, 20, 20))
        return image

    async def reset(self, seed: int) -> Observation:
        rng = random.Random(seed)
        self._image = self._draw(rng)
        self._reminders = 0
        system = Message(role="system", content="You read small text in pictures. Zoom in with the crop tool.")
        user = Message(role="user", content=(
            ImagePart(self._image),
            TextPart(f"The picture is {self.size[0]}x{self.size[1]} pixels. What is the number written in it? "
                     "Use the crop tool to zoom in, then reply with ANSWER: <number>.")))
        return Observation(messages=[system, user], tools=[self.crop.spec], info={"number": self._number})

    async def step(self, message: Message) -> EnvStep:
        assert self._image is not None, "reset first"
        text = message.text
        answer = ANSWER.search(text)
        if answer is not None:
            correct = int(answer.group(1)) == self._number
            return EnvStep(reward=float(correct), done=True, info={"answer": int(answer.group(1)), "correct": correct})
        if message.tool_calls:
            return EnvStep(messages=await run_tool_calls(message, [self.crop]),
                           info={"tool_calls": len(message.tool_calls)})
        if "<tool_call>" in text:  # the model tried to call a tool and the call did not parse
            return self._remind("Your tool call could not be parsed. Write it as <tool_call>\n"
                                '{"name": "crop", "arguments": {"box": [left, top, right, bottom]}}\n</tool_call>.')
        return self._remind("Call the crop tool to zoom in, or reply with ANSWER: <number>.")

    def _remind(self, text: str) -> EnvStep:
        self._reminders += 1
        done = self._reminders > self.max_reminders
        return EnvStep(messages=[] if done else [Message(role="user", content=text)], done=done,
                       info={"reminders": self._reminders})

    @tool
    def crop(self, box: Annotated[list[int], pydantic.Field(min_length=4, max_length=4)]) -> list[str | Image.Image]:
        """Crop the picture to a box (pixel coordinates) and return the crop, enlarged 2x.

        Args:
            box: [left, top, right, bottom]
        """
        assert self._image is not None, "reset first"
        w, h = self.size
        x0, y0, x1, y1 = max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3])
        if x1 - x0 < 4 or y1 - y0 < 4:
            raise ToolError(f"box {box} is empty or too small")
        crop = self._image.crop((x0, y0, x1, y1))
        crop = crop.resize((crop.width * 2, crop.height * 2), Image.Resampling.NEAREST)
        return [f"crop of [{x0}, {y0}, {x1}, {y1}]:", crop]
