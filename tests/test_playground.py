"""The playground page in a real headless browser (Playwright driving Debian's Chromium) against a
real API and worker that require a bearer key: a prompt goes in, the finished image comes out.

Set SD3SERVE_UPDATE_SCREENSHOT=1 to refresh docs/playground.png from this run.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from pathlib import Path

import pytest

from tests import stack_processes as sp

CHROMIUM = os.environ.get("SD3SERVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
API_KEY = "playground-test-key"
SCREENSHOT = sp.ROOT / "docs" / "playground.png"
STATIC = sp.ROOT / "api" / "static"
REFERENCE_MODEL = sp.ROOT / "models" / "sd3-shapes"

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the browser test)")
if not Path(CHROMIUM).exists():
    pytest.skip(
        f"{CHROMIUM} missing: `apt-get install -y chromium` in make test's setup (never `playwright install`)",
        allow_module_level=True,
    )


def test_static_files_are_plain_and_reference_each_other() -> None:
    html = (STATIC / "index.html").read_text()
    assert 'src="app.js"' in html and 'href="style.css"' in html
    js = (STATIC / "app.js").read_text()
    for route in (
        "v1/jobs",
        "/events",
        "text/event-stream",
        "/cancel",
        "?wait=",
        "Authorization",
        "localStorage",
        "openapi.json",
    ):
        assert route in js, route
    assert re.search(r"^\s*(import|export)\s", js, flags=re.M) is None, "plain script: no modules, no build step"
    assert 'type="module"' not in html


@pytest.mark.slow
def test_playground_submits_a_prompt_and_shows_the_image(tmp_path: Path, tiny_model_dir: Path) -> None:
    # The tiny model, or the reference model when refreshing the committed screenshot.
    model, side, steps = tiny_model_dir, 64, 4
    if os.environ.get("SD3SERVE_UPDATE_SCREENSHOT") and (REFERENCE_MODEL / "model_index.json").exists():
        model, side, steps = REFERENCE_MODEL, 128, 20
    # The API's defaults (read by the page from /openapi.json) fit the model.
    # With keys set the schema is hidden unless SD3SERVE_DOCS=public (the page then uses the server's defaults).
    api_env = {
        "SD3SERVE_API_KEYS": API_KEY,
        "SD3SERVE_DOCS": "public",
        "SD3SERVE_DEFAULT_WIDTH": str(side),
        "SD3SERVE_DEFAULT_HEIGHT": str(side),
        "SD3SERVE_DEFAULT_STEPS": str(steps),
    }
    with sp.running_stack(tmp_path, model, api_env_extra=api_env) as stack, playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 820})
            page_errors: list[str] = []
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            response = page.goto(f"{stack.api}/")
            assert response is not None and response.ok, f"the API does not serve the playground at /: {response}"
            assert page.title() == "sd3serve playground"
            page.wait_for_function(f"document.getElementById('steps').value === '{steps}'")  # from OpenAPI

            # Without the key the API answers 401 and the page says what to do.
            page.fill("#prompt", "a red circle on a blue background")
            page.click("#submit")
            page.wait_for_selector("#current[data-status=error]")
            assert "API key" in page.inner_text("#status")

            page.fill("#api-key", API_KEY)  # the key box opened itself
            page.click("summary:has-text('Settings')")
            page.fill("#seed", "7")
            page.click("#submit")
            page.wait_for_selector("#current[data-status=succeeded]", timeout=120_000)
            page.wait_for_function(
                "(() => { const i = document.getElementById('result-image'); return i.complete && i.naturalWidth > 0; })()"
            )
            assert page.eval_on_selector("#result-image", "i => [i.naturalWidth, i.naturalHeight]") == [side, side]
            assert "seed 7" in page.inner_text("#status")
            # The page followed the job over its event stream, not by polling.
            assert any(url.endswith("/events") for url in requested), requested
            assert not any("?wait=" in url for url in requested), requested
            job_id = page.get_attribute("#current", "data-job-id")
            assert page.get_attribute("#result-image", "data-job-id") == job_id

            # The key and the result persist: a reload shows the job in the recent strip.
            assert page.evaluate("localStorage.getItem('sd3serve.apiKey')") == API_KEY
            page.reload()
            page.wait_for_selector(f"#recent li[data-job-id='{job_id}'] img")
            page.click(f"#recent li[data-job-id='{job_id}']")
            page.wait_for_selector("#result:not([hidden])")

            # Two images in WebP: the second (seed 8) shows beside the first.
            page.fill("#prompt", "a red circle on a blue background")  # the reload emptied the form
            page.click("summary:has-text('Settings')")
            page.fill("#seed", "7")
            page.fill("#n", "2")
            page.select_option("#output_format", "webp")
            page.click("#submit")
            page.wait_for_function(
                "document.querySelectorAll('#result-more img').length === 1"
                " && document.querySelector('#result-more img').naturalWidth > 0",
                timeout=120_000,
            )
            assert "seeds 7–8" in page.inner_text("#result-caption") and "webp" in page.inner_text("#result-caption")
            assert page_errors == [], page_errors

            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
            assert _png_size(shot)[0] == 1100 and shot.stat().st_size > 10_000
            if os.environ.get("SD3SERVE_UPDATE_SCREENSHOT"):
                SCREENSHOT.parent.mkdir(exist_ok=True)
                shutil.copy(shot, SCREENSHOT)
        finally:
            browser.close()


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])
