"""The dashboard in a real browser (headless Debian Chromium driven by Playwright): sign-in, a loss curve that grows
while the job runs, the confusion matrix once it succeeded, and an upload error that names the file and line."""
from __future__ import annotations

import json
import math
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOSS_POINTS = ("() => { const e = document.querySelector('[data-testid=loss-curve]');"
               " return e ? Number(e.dataset.points) : -1; }")


@pytest.fixture
def page():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is needed: apt-get install -y chromium (.ci/run does it)", pytrace=False)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(15_000)
            page.script_errors = []
            page.on("pageerror", lambda e: page.script_errors.append(str(e)))
            yield page
        finally:
            browser.close()


def api_get(service, path: str) -> dict:
    req = urllib.request.Request(service.url + path, headers={"Authorization": f"Bearer {service.key}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def loss_points(page) -> int:
    return page.evaluate(LOSS_POINTS)


def test_dashboard_in_browser(page, service, tmp_path):
    from playwright.sync_api import expect

    job_id = service.slow_job(epochs=6)  # trains long enough (810 steps) for the curve to grow while watched

    # (1) No key: 401 with the sign-in form and no job data.
    response = page.goto(service.url + "/")
    assert response.status == 401, f"GET / without a key answered {response.status}"
    sign_in = page.locator("form[data-testid=sign-in]")
    expect(sign_in).to_be_visible()
    assert page.get_by_test_id("new-job-form").count() == 0, "the sign-in page shows the new-job form"
    assert "ftjob-" not in page.content(), "the sign-in page shows job data"

    # (2) Sign in through the form: the cookie is set and the dashboard lists the job.
    sign_in.locator("input[name=key]").fill(service.key)
    sign_in.locator("button[type=submit], input[type=submit]").first.click()
    row = page.locator("tr", has_text=job_id)
    expect(row).to_be_visible(timeout=20_000)
    cookie = next((c for c in page.context.cookies() if c["name"] == "tunelab_key"), None)
    assert cookie is not None and cookie["sameSite"] == "Strict", f"sign-in cookie: {cookie}"

    # (3) The job page: the loss curve gets points and keeps growing while the job runs.
    row.click()
    expect(page).to_have_url(f"{service.url}/#job={job_id}")
    page.wait_for_function(f"({LOSS_POINTS})() > 0", timeout=90_000)
    before = loss_points(page)
    status = service.client().fine_tuning.jobs.retrieve(job_id).status
    deadline, after = time.monotonic() + 10, before
    while time.monotonic() < deadline and after <= before:
        time.sleep(0.5)
        after = loss_points(page)
    assert after > before, (f"the loss curve did not grow in 10 s: {before} -> {after} points "
                            f"(job status was {status!r} when the first points showed)")

    # (4) Succeeded: the whole curve and the confusion matrix, one row per label (rows gold, columns predicted).
    job = service.wait(job_id, "succeeded", 300)
    metrics = api_get(service, f"/v1/fine_tuning/jobs/{job_id}/metrics")
    steps = sum(1 for h in metrics["history"] if isinstance(h.get("loss"), (int, float)) and math.isfinite(h["loss"]))
    page.wait_for_function(f"({LOSS_POINTS})() === {steps}", timeout=15_000)
    labels = metrics["metrics"]["labels"]
    matrix = page.get_by_test_id("confusion-matrix")
    expect(matrix).to_be_visible()
    assert matrix.locator("tbody tr").count() == len(labels), f"confusion matrix rows vs labels {labels}"
    for i, label in enumerate(labels):
        cells = matrix.locator("tbody tr").nth(i).locator("td").all_inner_texts()
        assert [int(c) for c in cells] == metrics["metrics"]["details"]["confusion_matrix"][i], f"row {label!r}"
    expect(page.get_by_text(job["fine_tuned_model"]).first).to_be_visible()

    # (5) A broken JSONL through the form: the error names the file and the line, and no job is started.
    jobs_before = len(service.client().fine_tuning.jobs.list(limit=100).data)
    page.get_by_text("all jobs").click()
    form = page.get_by_test_id("new-job-form")
    expect(form.locator("select[name=model] option").first).to_be_attached()
    broken = tmp_path / "broken.jsonl"
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}
    broken.write_text("".join(json.dumps(r) + "\n" for r in (ok, ok, bad, ok)), encoding="utf-8")
    form.locator("input[type=file]").set_input_files(str(broken))
    form.locator("button[type=submit]").click()
    error = page.get_by_test_id("form-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("broken.jsonl:3")
    expect(error).to_contain_text("robot")
    assert len(service.client().fine_tuning.jobs.list(limit=100).data) == jobs_before, "a job started from a bad file"

    # (6) An image job from zips holding a CSV of paths and labels: its page shows its most confident mistakes.
    client = service.client()
    ids = [client.files.create(file=open(_image_table_zip(tmp_path / f"{name}.zip", per_class, offset), "rb"),
                               purpose="fine-tune") for name, per_class, offset in (("train", 12, 0), ("eval", 6, 100))]
    assert [f.format for f in ids] == ["image_label", "image_label"] and ids[0].records == 36
    image_job = client.fine_tuning.jobs.create(model="tiny-cnn", training_file=ids[0].id, validation_file=ids[1].id,
                                               extra_body={"tuning": "head"})
    service.wait(image_job.id, "succeeded", 300)
    page.goto(f"{service.url}/#job={image_job.id}")
    grid = page.get_by_test_id("mistakes")
    expect(grid).to_be_visible(timeout=20_000)
    page.wait_for_function("() => document.querySelector('[data-testid=mistakes]').naturalWidth > 0")  # decoded

    # (7) Cancel from the job's page: the running job stops and says so.
    running = service.slow_job(epochs=6)
    page.goto(f"{service.url}/#job={running}")
    service.wait(running, "running", 120)
    cancel = page.locator("#cancel")
    expect(cancel).to_be_visible(timeout=20_000)
    cancel.click()
    expect(page.locator("#job-status")).to_have_text("cancelled", timeout=30_000)
    assert service.job(running)["status"] == "cancelled"

    # (8) The key's project and its quota use; an admin sees every project with theirs.
    page.goto(f"{service.url}/#")
    expect(page.get_by_test_id("me")).to_contain_text("project default (member)")
    expect(page.get_by_test_id("projects")).to_be_hidden()
    from tunelab.serve import keys

    _, admin = keys.create(service.home, "dashboard admin", "ops", admin=True)
    ops = next(p for p in keys.projects(service.home) if p["name"] == "ops")
    req = urllib.request.Request(f"{service.url}/v1/organization/projects/{ops['id']}/quotas", method="POST",
                                 data=json.dumps({"queued_jobs": 3, "file_bytes": 2_000_000}).encode(),
                                 headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).close()
    page.context.add_cookies([{"name": "tunelab_key", "value": admin, "url": service.url, "sameSite": "Strict"}])
    page.reload()  # (the page reads its key when it loads)
    expect(page.get_by_test_id("me")).to_contain_text("project ops (admin)")
    table = page.get_by_test_id("projects")
    expect(table).to_be_visible()
    expect(table.locator("tr[data-project=ops]")).to_contain_text("0 of 3")
    expect(table.locator("tr[data-project=ops]")).to_contain_text("0 B of 2.0 MB")
    expect(table.locator("tr[data-project=default]")).to_be_visible()

    assert not page.script_errors, f"JavaScript errors on the dashboard: {page.script_errors}"


def _image_table_zip(path: Path, per_class: int, offset: int) -> Path:
    """A zip of digit PNGs under pics/ and data.csv naming each with its label."""
    import io
    import zipfile

    from conftest import digit_images

    rows = ["image,label"]
    with zipfile.ZipFile(path, "w") as z:
        for k, (img, label) in enumerate(digit_images(per_class, offset)):
            png = io.BytesIO()
            img.save(png, "PNG")
            z.writestr(f"pics/{k}.png", png.getvalue())
            rows.append(f"pics/{k}.png,{label}")
        z.writestr("data.csv", "\n".join(rows) + "\n")
    return path
