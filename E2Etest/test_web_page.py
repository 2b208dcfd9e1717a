"""The web page (GET /) in a real browser: Debian's headless Chromium driven by Playwright, against live servers on
the tiny checkpoint. Every wait is for a state of the page's DOM (its data-* attributes), with generous bounds that
only stop a hang. Screenshots land in E2Etest/.logs/ (web-page.png, web-page-phone.png) as test artifacts.
"""

from __future__ import annotations

import http.client
import io
import shutil
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from conftest import LOGS, ServerProcess, checkpoint, decode

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless as root needs --no-sandbox; the rest keep a closed network quiet (no update, sync or QUIC probes), let
# audio start without a click, and give getUserMedia a fake microphone (a beep) without a permission prompt.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
SYNTHESIS_MS = 300_000          # a bound on one synthesis seen from the page (the machine may be very busy)
TEXT = "Hello there."


def wav(seconds: float, amplitude: float = 0.2, rate: int = 24000) -> bytes:
    """A voice-like test sample: a 220 Hz tone with a 3 Hz tremolo, as 16-bit WAV."""
    t = np.arange(int(seconds * rate)) / rate
    pcm = amplitude * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((pcm * 32767).astype("<i2").tobytes())
    return out.getvalue()


def server_constant(name: str):
    """A constant of server.py (LANGUAGES, DIALECTS, DESIGN_SCRIPTS): the values the server accepts, some computed
    from its language table, so they are read from the module itself."""
    import server

    return getattr(server, name)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed: scripts/install.sh --dev installs it as root (apt-get chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright gives every launch a fresh temporary profile (--user-data-dir) and removes it afterwards.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def web_server() -> Iterator[ServerProcess]:
    proc = ServerProcess("web", {"MODEL_ID": checkpoint("tiny-0.6B-CustomVoice")}).start()
    yield proc
    proc.stop()


@dataclass
class Tab:
    """A page in its own browser context, with what it logged as errors."""

    page: object
    errors: list = field(default_factory=list)

    def dataset(self, selector: str) -> dict:
        return self.page.eval_on_selector(selector, "e => ({...e.dataset})")

    def speak_and_wait(self, press=None) -> dict:
        """Start a run (a click on Speak, or `press`) and wait for its end: the result of the next run number."""
        number = int(self.dataset("#result").get("run", 0)) + 1
        (press or (lambda: self.page.click("#speak")))()
        self.page.wait_for_selector(f"#result[data-run='{number}']:not([data-state=streaming])", timeout=SYNTHESIS_MS)
        return self.dataset("#result")


def open_tab(browser, url: str, **context_options) -> Tab:
    context = browser.new_context(accept_downloads=True, **context_options)
    context.set_default_timeout(60_000)
    page = context.new_page()
    tab = Tab(page)
    page.on("console", lambda message: message.type == "error" and tab.errors.append(message.text))
    page.on("pageerror", lambda error: tab.errors.append(str(error)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]")
    return tab


@pytest.fixture()
def tab(browser, web_server) -> Iterator[Tab]:
    tab = open_tab(browser, web_server.url, viewport={"width": 1280, "height": 900})
    yield tab
    tab.page.context.close()


def test_the_page_loads_without_errors_and_shows_the_server_state(tab, web_server):
    assert f"web page: {web_server.url}/" in web_server.log_path.read_text()   # the address printed at start
    for path in ("/", "/static/app.js", "/static/app.css"):                  # revalidated: never stale after an upgrade
        answer = httpx.get(web_server.url + path)
        assert answer.status_code == 200 and answer.headers["cache-control"] == "no-cache", path
    script = httpx.get(web_server.url + "/static/app.js")
    assert httpx.get(web_server.url + "/static/app.js",
                     headers={"If-None-Match": script.headers["etag"]}).status_code == 304
    page = tab.page
    page.wait_for_selector("#server-summary[data-state=ready]")
    assert "model ready" in page.inner_text("#server-summary")
    assert "ready" in page.inner_text("#server-state")
    listing = httpx.get(web_server.url + "/v1/audio/voices").json()["voices"]
    groups = page.eval_on_selector_all("#voice optgroup",
                                       "gs => gs.map(g => [g.label, [...g.children].map(o => o.value)])")
    kinds = {"Your voices": "custom", "Qwen3-TTS speakers": "builtin", "OpenAI voice names": "openai_alias"}
    expected = {label: [v["id"] for v in listing if v["kind"] == kind] for label, kind in kinds.items()}
    assert dict(groups) == {label: ids for label, ids in expected.items() if ids}
    assert "Qwen3-TTS speakers" in dict(groups)
    assert tab.errors == []


def test_the_menus_offer_what_the_server_accepts(tab, web_server):
    """The page states the formats, languages and design languages once more (it is static): they must match."""
    page = tab.page
    options = lambda selector: page.eval_on_selector_all(f"{selector} option", "os => os.map(o => o.value)")  # noqa: E731
    schema = httpx.get(web_server.url + "/openapi.json").json()["components"]["schemas"]["SpeechRequest"]
    formats = next(s["enum"] for s in schema["properties"]["response_format"]["anyOf"] if "enum" in s)
    assert options("#format") == formats
    assert options("#language") == ["", *server_constant("LANGUAGES").values(), *server_constant("DIALECTS")]
    assert sorted(options("#design-language")) == sorted(server_constant("DESIGN_SCRIPTS"))


def test_every_control_has_a_label_and_the_page_fits_a_phone(browser, web_server):
    tab = open_tab(browser, web_server.url, viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
    try:
        page = tab.page
        unlabeled = page.eval_on_selector_all(
            "input, select, textarea, button",
            "es => es.filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')"
            " && !e.textContent.trim()).map(e => e.outerHTML)")
        assert unlabeled == []
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        page.screenshot(path=str(LOGS / "web-page-phone.png"), full_page=True)
        assert tab.errors == []
    finally:
        page.context.close()


def test_speech_streams_plays_and_downloads(tab, web_server):
    page = tab.page
    page.fill("#text", TEXT)
    page.select_option("#voice", "ryan")
    page.click("summary")
    page.fill("#seed", "7")
    # Start it from the keyboard: Tab from the text box reaches the Speak button, Enter presses it.
    page.focus("#text")
    for _ in range(30):
        if page.evaluate("document.activeElement.id") == "speak":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "speak"
    result = tab.speak_and_wait(press=lambda: page.keyboard.press("Enter"))
    assert result["state"] == "done", page.inner_text("#speak-error")

    # The page's own timings: the first audio came before the end, in several chunks, and it played while streaming.
    assert int(result["chunks"]) >= 2
    assert 0 < int(result["firstAudioMs"]) < int(result["totalMs"])
    assert result["playedWhileStreaming"] == "true"
    seconds = float(result["audioSeconds"])
    assert float(result["rtf"]) == pytest.approx(seconds / (int(result["totalMs"]) / 1000), rel=0.01, abs=0.01)
    assert page.inner_text("#t-seed") == "7"
    # The replay element holds what was received, and reports its duration.
    page.wait_for_function("() => document.querySelector('#replay').duration > 0")
    assert page.evaluate("document.querySelector('#replay').duration") == pytest.approx(seconds, abs=0.002)
    page.screenshot(path=str(LOGS / "web-page.png"), full_page=True)

    # What the page played is what the API gives for the same request.
    api = httpx.post(web_server.url + "/v1/audio/speech", timeout=SYNTHESIS_MS / 1000,
                     json={"input": TEXT, "voice": "ryan", "seed": 7, "response_format": "pcm"})
    expected = decode(api.content, "pcm")[0]
    page.select_option("#format", "pcm")
    with page.expect_download() as download:
        page.click("#download")
    played = decode(Path(download.value.path()).read_bytes(), "pcm")[0]
    assert played.shape == expected.shape
    assert np.max(np.abs(played - expected)) <= 4 / 32768
    assert played.size / 24000 == pytest.approx(seconds, abs=1e-3)

    # Another format comes from the server, with the run's seed: the same audio, encoded.
    page.select_option("#format", "flac")
    with page.expect_download(timeout=SYNTHESIS_MS) as download:
        page.click("#download")
    assert download.value.suggested_filename == "speech.flac"
    flac, rate = decode(Path(download.value.path()).read_bytes(), "flac")
    assert rate == 24000 and flac.shape == expected.shape
    assert np.max(np.abs(flac - expected)) <= 4 / 32768
    assert tab.errors == []


def test_stop_ends_the_run_and_frees_the_server(tab, web_server):
    page = tab.page
    page.fill("#text", " ".join([TEXT + " This sentence makes the reading long enough to stop it halfway."] * 3))
    page.click("#speak")
    page.wait_for_selector("#result[data-state=streaming]:not([data-chunks='0'])", timeout=SYNTHESIS_MS)
    page.click("#stop")
    page.wait_for_selector("#result:not([data-state=streaming])")
    assert tab.dataset("#result")["state"] == "stopped"
    assert page.is_disabled("#download") and page.is_enabled("#speak")
    for _ in range(600):                                             # the server cancels the job within a frame
        if httpx.get(web_server.url + "/health").json()["queue_depth"] == 0:
            break
        page.wait_for_timeout(200)
    assert httpx.get(web_server.url + "/health").json()["queue_depth"] == 0
    assert tab.errors == []


def test_an_empty_text_shows_the_api_message(tab, web_server):
    page = tab.page
    page.fill("#text", "")
    result = tab.speak_and_wait()
    assert result["state"] == "error"
    answer = httpx.post(web_server.url + "/v1/audio/speech", json={"input": "", "response_format": "pcm"})
    assert answer.status_code == 400
    assert page.inner_text("#speak-error") == answer.json()["error"]["message"]
    assert "input" in page.inner_text("#speak-error")


def test_a_voice_from_an_uploaded_file_is_created_spoken_and_deleted(tab, web_server):
    page = tab.page
    page.fill("#clone-name", "webvoice")
    page.set_input_files("#clone-sample", files=[{"name": "sample.wav", "mimeType": "audio/wav", "buffer": wav(3)}])
    page.set_input_files("#consent-recording",
                         files=[{"name": "consent.wav", "mimeType": "audio/wav", "buffer": wav(3, 0.3)}])
    page.click("#clone-form button[type=submit]")
    page.wait_for_selector("#clone-form[data-created-voice]", timeout=SYNTHESIS_MS)
    voice_id = tab.dataset("#clone-form")["createdVoice"]
    assert voice_id.startswith("voice_"), page.inner_text("#clone-form .status")
    assert page.eval_on_selector("#voice", "s => s.value") == voice_id      # chosen at once
    assert httpx.get(f"{web_server.url}/v1/audio/voices/{voice_id}").json()["name"] == "webvoice"
    assert page.is_visible(f"#voice-list tr[data-voice-id={voice_id}]")

    page.fill("#text", TEXT)
    result = tab.speak_and_wait()
    assert result["state"] == "done", page.inner_text("#speak-error")
    assert float(result["audioSeconds"]) > 0

    page.once("dialog", lambda dialog: dialog.accept())
    page.click(f"#voice-list tr[data-voice-id={voice_id}] button:text('Delete')")
    page.wait_for_selector(f"#voice-list tr[data-voice-id={voice_id}]", state="detached")
    assert httpx.get(f"{web_server.url}/v1/audio/voices/{voice_id}").status_code == 404
    assert page.eval_on_selector("#voice", "s => s.value") == ""
    assert tab.errors == []


def test_a_voice_from_the_microphone(tab, web_server):
    """Chromium's fake microphone (a beep) recorded by MediaRecorder: webm/opus, uploaded as the sample."""
    page = tab.page
    page.fill("#clone-name", "micvoice")
    page.set_input_files("#consent-recording", files=[{"name": "c.wav", "mimeType": "audio/wav", "buffer": wav(3)}])
    page.click("button.record[data-for=clone-sample]")
    page.wait_for_function("() => Number(document.querySelector('.recording[data-of=clone-sample]').dataset.seconds)"
                           " >= 3.5")
    page.click("button.record[data-for=clone-sample]")
    page.wait_for_selector(".recording[data-of=clone-sample][data-state=recorded]")
    page.click("#clone-form button[type=submit]")
    page.wait_for_selector("#clone-form[data-created-voice]", timeout=SYNTHESIS_MS)
    voice_id = tab.dataset("#clone-form")["createdVoice"]
    assert voice_id.startswith("voice_"), page.inner_text("#clone-form .status")
    assert tab.errors == []


def test_a_voice_designed_from_a_description(tab, web_server):
    page = tab.page
    page.wait_for_selector("#server-summary[data-state=ready]")          # /health has said which model designs
    page.fill("#design-name", "narrator")
    page.fill("#design-prompt", "A calm, low voice.")
    page.fill("#design-script", TEXT)
    page.click("#design-form button[type=submit]")
    page.wait_for_selector("#design-form[data-created-voice]", timeout=SYNTHESIS_MS)
    voice_id = tab.dataset("#design-form")["createdVoice"]
    assert voice_id.startswith("voice_"), page.inner_text("#design-form .status")
    assert page.eval_on_selector("#voice", "s => s.value") == voice_id
    assert page.inner_text(f"#voice-list tr[data-voice-id={voice_id}]").startswith("narrator\tdescription: A calm")
    assert httpx.get(f"{web_server.url}/v1/audio/voices/{voice_id}").json()["type"] == "prompt"
    assert tab.errors == []


def test_without_a_microphone_api_the_page_says_why(browser, web_server):
    """As on plain http:// from another host, where browsers give a page no navigator.mediaDevices."""
    context = browser.new_context()
    context.add_init_script("Object.defineProperty(Navigator.prototype, 'mediaDevices', {get: () => undefined})")
    page = context.new_page()
    try:
        page.goto(web_server.url + "/")
        page.wait_for_selector("body[data-ready=true]")
        assert page.is_disabled("button.record[data-for=clone-sample]")
        assert "https://" in page.inner_text(".recording[data-of=clone-sample]")
        page.set_input_files("#clone-sample", files=[{"name": "s.wav", "mimeType": "audio/wav", "buffer": wav(3)}])
        assert "https://" in page.inner_text(".recording[data-of=clone-sample]")
        preview = "audio.preview[data-of=clone-sample]"                     # the chosen file can be listened to
        assert page.eval_on_selector(preview, "a => !a.hidden && a.src.startsWith('blob:')")
    finally:
        context.close()


def test_a_failed_clone_shows_the_api_message_and_leaves_no_consent(tab, web_server):
    page = tab.page
    consents = lambda: httpx.get(web_server.url + "/v1/audio/voice_consents").json()["data"]  # noqa: E731
    before = consents()
    page.fill("#clone-name", "tooshort")
    page.set_input_files("#clone-sample", files=[{"name": "s.wav", "mimeType": "audio/wav", "buffer": wav(0.5)}])
    page.set_input_files("#consent-recording", files=[{"name": "c.wav", "mimeType": "audio/wav", "buffer": wav(3)}])
    page.click("#clone-form button[type=submit]")
    page.wait_for_selector("#clone-form[data-created-voice='']", timeout=SYNTHESIS_MS)
    assert consents() == before                  # the consent uploaded for this attempt was deleted again

    consent = httpx.post(web_server.url + "/v1/audio/voice_consents", data={"name": "c", "language": "en-US"},
                         files={"recording": ("c.wav", wav(3), "audio/wav")}).json()["id"]
    answer = httpx.post(web_server.url + "/v1/audio/voices", data={"name": "tooshort", "consent": consent},
                        files={"audio_sample": ("s.wav", wav(0.5), "audio/wav")})
    httpx.delete(f"{web_server.url}/v1/audio/voice_consents/{consent}")
    assert answer.status_code == 400
    assert page.inner_text("#clone-form .status") == f"Not created: {answer.json()['error']['message']}"


def test_a_model_that_cannot_load_is_shown_with_why(browser, tmp_path):
    server = ServerProcess("web-broken", {"MODEL_ID": str(tmp_path / "no-such-model")}).start()
    try:
        tab = open_tab(browser, server.url)
        page = tab.page
        page.wait_for_selector("#server-summary[data-state=failed]")
        health = httpx.get(server.url + "/health").json()
        assert page.inner_text("#model-error") == f"The model cannot be used: {health['model_error']}"
        assert "MODEL_ID" in health["model_error"]
        result = tab.speak_and_wait()
        assert result["state"] == "error"
        answer = httpx.post(server.url + "/v1/audio/speech", json={"input": TEXT})
        assert answer.status_code == 503
        assert page.inner_text("#speak-error") == answer.json()["error"]["message"]
        page.context.close()
    finally:
        server.stop()


def test_the_api_key_prompt(browser):
    server = ServerProcess("web-key", {"MODEL_ID": checkpoint("tiny-0.6B-CustomVoice"), "API_KEY": "s3cret"}).start()
    try:
        # The page's own files are open; the API is not, also not through the static mount.
        assert httpx.get(server.url + "/").status_code == 200
        assert httpx.get(server.url + "/static/app.js").status_code == 200
        assert httpx.get(server.url + "/v1/audio/voices").status_code == 401
        assert raw_get(server.url, "/static/../v1/audio/voices") == 404

        tab = open_tab(browser, server.url)
        page = tab.page
        page.wait_for_selector("#key-section:not([hidden])")
        refusal = httpx.get(server.url + "/v1/audio/voices").json()["error"]["message"]
        assert page.inner_text("#key-message") == refusal
        assert page.evaluate("document.activeElement.id") == "api-key"
        page.wait_for_selector("#server-summary[data-state=ready]")       # /health needs no key

        page.fill("#api-key", "wrong")
        page.press("#api-key", "Enter")
        page.wait_for_selector("#key-section:not([hidden])")
        assert page.inner_text("#key-message") == f"The key was refused: {refusal}"

        page.fill("#api-key", "s3cret")
        page.click("#key-form button")
        page.wait_for_selector("#key-section", state="hidden")
        page.wait_for_selector("#voice optgroup", state="attached")
        page.fill("#text", TEXT)
        result = tab.speak_and_wait()
        assert result["state"] == "done", page.inner_text("#speak-error")
        assert page.evaluate("sessionStorage.getItem('qwen3-tts-api-key')") == "s3cret"
        page.context.close()
    finally:
        server.stop()


def raw_get(url: str, path: str) -> int:
    """GET a path as written (httpx would resolve the '..')."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()
