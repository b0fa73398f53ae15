"""The demo's page in a real browser, on the demo's own models: a tiny `mmfusion demo --no-serve` trains a CLIP, a
captioner and a VQA model for seconds, then the page searches with the CLIP, captions and answers with the other
two, and shows each model's card. Tiny models write arbitrary words, so every text on the page is checked against
the same model called directly on the same image. Screenshots go to runs/test-artifacts/browser/."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("fastapi")

from mmfusion import load  # noqa: E402
from mmfusion.data.images import load_image  # noqa: E402
from mmfusion.serve.app import create_app  # noqa: E402
from mmfusion.serve.settings import ServeSettings  # noqa: E402
from tests.cli.test_demo import DEMO, GALLERY  # noqa: E402
from tests.serve.conftest import run_server, shot  # noqa: E402
from tests.serve.test_browser import (  # noqa: E402, F401  (browser and page are fixtures used here)
    open_card,
    search,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A demo directory, as `mmfusion demo --no-serve` leaves it, and the page serving it with its own models."""
    out = tmp_path_factory.mktemp("browser-demo")
    cmd = [sys.executable, "-m", "mmfusion.cli.main", *DEMO, "--out", str(out), "--no-serve"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    settings = ServeSettings(db=str(out / "index"), captioner=str(out / "caption"), answerer=str(out / "vqa"))
    with run_server(create_app(settings)) as url:
        yield out, url


def _settled(page) -> str:
    page.wait_for_function("document.getElementById('answer').getAttribute('aria-busy') === 'false'")
    assert page.inner_text("#ask-error") == ""
    return page.inner_text("#answer-text")


def shown_as(text: str) -> str:
    return text or "(no answer)"  # what the page writes for an empty generation (a model trained for seconds)


def test_search_caption_and_ask_run_on_the_demos_own_models(page, demo):
    out, url = demo
    page.goto(url)
    cards = search(page, "a red circle")
    assert len(cards) == min(24, GALLERY)  # the page's K results from the demo's gallery
    name = cards[0]["name"]
    open_card(page, name)
    image = load_image(out / "shapesworld" / "test" / "images" / name)

    page.click("#caption")
    page.wait_for_function("document.getElementById('answer-label').textContent === 'Caption'")
    assert _settled(page) == shown_as(load(out / "caption").caption([image])[0])

    question = "what colour is the circle?"
    page.fill("#question", question)
    page.press("#question", "Enter")
    assert _settled(page) == shown_as(load(out / "vqa").answer([image], [question])[0])
    shot(page, "demo-own-models-panel")


def test_the_page_shows_a_card_for_each_model(page, demo):
    _, url = demo
    page.goto(url)
    page.wait_for_selector("#models:not([hidden]) .model-card")
    roles = page.eval_on_selector_all("#model-cards .model-card", "cs => cs.map(c => c.dataset.role)")
    assert roles == ["embedder", "captioner", "answerer"]
    text = page.inner_text("#model-cards")
    for figure in ("image→text R@10", "attribute accuracy", "VQA accuracy", "steps in"):
        assert figure in text, text
    page.wait_for_function(
        "[...document.querySelectorAll('#model-cards img.curve')].every(i => i.complete && i.naturalWidth > 0)"
    )
    assert page.locator("#model-cards img.curve").count() == 3
    page.locator("#models").scroll_into_view_if_needed()
    shot(page, "demo-model-cards")
