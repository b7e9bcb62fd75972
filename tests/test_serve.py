"""The web studio: its HTTP API through FastAPI's test client, and the page in headless Chromium."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from adversarial import write_adversarial_files, write_generation_hostile_files
from fastapi.testclient import TestClient
from symusic import Score

from polyphony.generation import DEFAULT_TOP_P, load_checkpoint
from polyphony.serve import MAX_UPLOAD_BYTES, create_app

REPO = Path(__file__).resolve().parents[1]
SMALL = {"instruments": "piano, bass, drums", "bars": 2}


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(time_limit=30.0)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def song(fixture_midi_dir) -> bytes:
    return sorted((fixture_midi_dir / "band").glob("*.mid"))[0].read_bytes()


def assert_one_line_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert message and "\n" not in message
    return message


# ----------------------------------------------------------------------------- endpoints
def test_page_and_its_assets_are_served_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and "polyphony studio" in page.text
    for asset in ("/static/studio.js", "/static/studio.css"):
        assert client.get(asset).status_code == 200
    assert "http" not in page.text.replace("http-equiv", "")  # nothing from a CDN


def test_instruments_and_model(client):
    catalogue = client.get("/api/instruments").json()
    assert len(catalogue) == 129
    drums = next(e for e in catalogue if e["id"] == 128)
    assert "drums" in drums["aliases"]
    model = client.get("/api/model").json()
    assert model["parameters"] > 0 and model["max_upload_bytes"] == MAX_UPLOAD_BYTES
    assert model["top_p"] == DEFAULT_TOP_P  # the page's top-p field starts there


def test_generate_answers_midi_with_the_requested_instruments(client):
    response = client.post("/api/generate", json={**SMALL, "seed": 3, "density": "bass=4"})
    assert response.status_code == 200 and response.headers["content-type"] == "audio/midi"
    score = Score.from_midi(response.content)
    assert sorted((t.is_drum, t.program) for t in score.tracks) == [
        (False, 0),
        (False, 33),
        (True, 0),
    ]
    notes = client.post("/api/notes", files={"file": ("x.mid", response.content)}).json()
    assert len(notes["tracks"]) == 3 and notes["bars"][0] == 0
    assert sum(len(t["notes"]) for t in notes["tracks"]) == score.note_num()


def test_continue_and_arrange_take_an_upload(client, song):
    upload = {"file": ("song.mid", song, "audio/midi")}
    continued = client.post(
        "/api/continue", files=upload, data={"bars": 2, "prompt_bars": 2, "seed": 1}
    )
    assert continued.status_code == 200, continued.text
    assert Score.from_midi(continued.content).note_num() > 0
    original = Score.from_midi(song)
    piece = Score(original.ticks_per_quarter)
    piece.tempos, piece.time_signatures = original.tempos, original.time_signatures
    piece.tracks = [t for t in original.tracks if not t.is_drum][:1]
    short = piece.clip(0, 8 * original.ticks_per_quarter)
    arranged = client.post(
        "/api/arrange", files={"file": ("a.mid", short.dumps_midi())}, data={"add": "drums"}
    )
    assert arranged.status_code == 200, arranged.text
    assert any(t.is_drum for t in Score.from_midi(arranged.content).tracks)


def test_infill_writes_the_chosen_bars_of_the_chosen_tracks_again(client, song):
    original = Score.from_midi(song)
    piece = original.clip(0, 24 * original.ticks_per_quarter)  # 6 bars of 4/4
    data = piece.dumps_midi()
    filled = client.post(
        "/api/infill", files={"file": ("p.mid", data)}, data={"bars": "3-4", "tracks": "drums"}
    )
    assert filled.status_code == 200, filled.text
    result = Score.from_midi(filled.content)
    # The pitched tracks are not touched anywhere (to the tokenizer's grid).
    tokenizer = load_checkpoint().tokenizer
    kept = tokenizer.decode(tokenizer.encode(Score.from_midi(data)).ids)
    pitched = sorted((t.program, t.note_num()) for t in kept.tracks if not t.is_drum)
    assert pitched == sorted((t.program, t.note_num()) for t in result.tracks if not t.is_drum)
    assert_one_line_error(
        client.post("/api/infill", files={"file": ("p.mid", data)}, data={"bars": "40-44"}), 400
    )


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"instruments": "piano, trumpetz", "bars": 2}, "trumpetz"),
        ({"instruments": "piano", "bars": 0}, "bars"),
        ({"instruments": "piano", "bars": 100000}, "bars"),
        ({"bars": 2}, "instruments"),
        ({"instruments": "piano", "bars": "many"}, "bars"),
    ],
)
def test_bad_requests_get_a_4xx_with_one_line(client, body, expected):
    response = client.post("/api/generate", json=body)
    assert 400 <= response.status_code < 500
    assert expected in assert_one_line_error(response, response.status_code)
    assert client.post("/api/generate", json={**SMALL, "seed": 0}).status_code == 200


def test_bad_uploads_get_a_4xx_with_one_line_and_the_server_keeps_serving(
    client, tmp_path, fixture_midi_dir
):
    text = client.post("/api/continue", files={"file": ("notes.mid", b"not a MIDI file" * 10)})
    assert "notes.mid" in assert_one_line_error(text, 400)
    huge = client.post("/api/arrange", files={"file": ("big.mid", b"\0" * 50 * 2**20)},
                       data={"add": "drums"})  # fmt: skip
    assert "larger than" in assert_one_line_error(huge, 413)
    good = sorted((fixture_midi_dir / "band").glob("*.mid"))[0]
    names = set(write_adversarial_files(tmp_path, good)) | set(
        write_generation_hostile_files(tmp_path)
    )
    refused = 0
    for name in sorted(names):
        path = tmp_path / name
        if not path.is_file() or path.is_symlink() or path.stat().st_size == len(good.read_bytes()):
            continue  # links, pipes and folders are not uploads; skip the copy of a good file
        response = client.post(
            "/api/arrange", files={"file": (name, path.read_bytes())}, data={"add": "drums"}
        )
        if response.status_code != 200:
            assert_one_line_error(response, response.status_code)
            assert response.status_code < 500, (name, response.text)
            refused += 1
    assert refused >= 15
    assert client.post("/api/generate", json={**SMALL, "seed": 0}).status_code == 200


def test_concurrent_requests_answer_what_each_answers_alone(client):
    bodies = [{**SMALL, "seed": seed} for seed in range(8)]
    alone = [client.post("/api/generate", json=body).content for body in bodies]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda b: client.post("/api/generate", json=b).content, bodies))
    assert together == alone
    assert len(set(alone)) > 1  # different seeds, different pieces


def test_a_compiled_studio_compiles_before_serving_and_never_while_a_request_decodes(song):
    # `polyphony serve --compile`: the decode step is traced at startup (in this thread), so no
    # request pays the compile under its time limit; requests decode in the worker thread.
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    app = create_app(time_limit=30.0, compile=True)
    traced = counters["stats"]["unique_graphs"]
    assert traced > before
    with TestClient(app) as client:
        piece = client.post("/api/generate", json={**SMALL, "bars": 4, "seed": 1})
        continued = client.post(
            "/api/continue", files={"file": ("song.mid", song)}, data={"bars": 2, "seed": 2}
        )
    assert counters["stats"]["unique_graphs"] == traced
    assert piece.status_code == 200 and continued.status_code == 200, continued.text
    score = Score.from_midi(piece.content)
    assert sorted((t.is_drum, t.program) for t in score.tracks) == [
        (False, 0),
        (False, 33),
        (True, 0),
    ]
    assert all(len(t.notes) > 0 for t in score.tracks)


def test_the_server_decodes_on_one_thread_unless_told(monkeypatch):
    # As generate.py. On torch's default, every core, a compiled 16-bar request took 2.5-2.9x as
    # long on a 2-core machine (benchmarks/serve.py: inductor's kernels split across threads).
    import torch
    import uvicorn

    from polyphony import serve

    monkeypatch.setattr(uvicorn, "run", lambda app, **options: None)
    monkeypatch.setattr(serve, "create_app", lambda *args: object())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert serve.main([]) == 0 and torch.get_num_threads() == 1
        assert serve.main(["--threads", "2"]) == 0 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_worker_queue_is_bounded():
    """Requests beyond the queue are told to come back (503), not stacked without end."""
    import asyncio

    from polyphony.serve import Busy, Worker

    worker = Worker(max_waiting=1)

    async def three_at_once():
        calls = [worker.run(time.sleep, 0.3) for _ in range(3)]
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(three_at_once())
    assert sum(isinstance(o, Busy) for o in outcomes) == 1
    assert sum(o is None for o in outcomes) == 2


# ----------------------------------------------------------------------------- the browser
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    import uvicorn

    port = free_port()
    config = uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    instance.should_exit = True
    thread.join(timeout=10)


def test_the_page_in_headless_chromium_generates_a_piano_roll(server, tmp_path, song):
    """Picks piano, bass, drums; generates; sees three tracks in the legend, a drawn roll and
    a download link. Saves a screenshot (docs/studio.png comes from this test). Then infills
    two bars of an uploaded file."""
    upload = tmp_path / "upload.mid"
    original = Score.from_midi(song)
    original.clip(0, 16 * original.ticks_per_quarter).dump_midi(upload)
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1500,900",
        f"--user-data-dir={tmp_path / 'p'}",
    ):
        options.add_argument(flag)  # fmt: skip
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get(server)
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#catalogue option"))
        top_p = wait.until(lambda b: b.find_element(By.ID, "top_p").get_attribute("value"))
        assert float(top_p) == DEFAULT_TOP_P  # the page samples as generate() does
        search = browser.find_element(By.ID, "search")
        for name in ("piano", "bass", "drums"):
            search.send_keys(name)
            browser.find_element(By.ID, "add").click()
        assert len(browser.find_elements(By.CSS_SELECTOR, "#tracks li")) == 3
        bars = browser.find_element(By.ID, "bars")
        bars.clear()
        bars.send_keys("4")
        browser.find_element(By.ID, "seed").send_keys("7")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: b.find_element(By.ID, "download").get_attribute("href"))
        legend = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#legend li")]
        assert len(legend) == 3, legend
        assert any("Piano" in item for item in legend) and any("Drums" in item for item in legend)
        assert "error" not in browser.find_element(By.ID, "status").get_attribute("class")
        painted = browser.execute_script(
            "const c = document.getElementById('roll');"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n;"
        )
        assert painted > 1000  # notes and bar lines were drawn
        browser.save_screenshot(str(tmp_path / "studio.png"))
        assert (tmp_path / "studio.png").stat().st_size > 10_000
        # Infill bars 2-3 of an uploaded file: a new result replaces the first.
        before = browser.find_element(By.ID, "download").get_attribute("href")
        browser.find_element(By.ID, "file").send_keys(str(upload))
        browser.find_element(By.ID, "infill_bars").send_keys("2-3")
        browser.find_element(By.ID, "infill").click()
        wait.until(lambda b: b.find_element(By.ID, "download").get_attribute("href") != before)
        assert "error" not in browser.find_element(By.ID, "status").get_attribute("class")
        assert browser.find_elements(By.CSS_SELECTOR, "#legend li")
    finally:
        browser.quit()
