"""The README's picture of the chat page: serve a checkpoint, ask it questions in headless Chromium, screenshot.

    python scripts/screenshot_chat.py --checkpoint out/sft --out docs/img/serve_chat.png

Needs Chromium + chromedriver (Debian: apt-get install chromium chromium-driver; `make setup-test` does it as
root) and selenium (requirements-test.txt). The answers are the model's own, greedy (temperature 0).
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="out/sft")
    ap.add_argument("--out", default="docs/img/serve_chat.png")
    ap.add_argument("--system", default="Answer briefly.")
    ap.add_argument("--questions", default="len('banana') = ?|sorted([3, 1, 2]) = ?|'abc'.upper() = ?")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), f"checkpoint={args.checkpoint}",
                               f"port={port}"], stdout=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("google-chrome") or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=900,620", "--hide-scrollbars"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    try:
        for _ in range(600):  # the server loads the model first
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        driver.get(url + "/")
        box = driver.find_element(By.ID, "temperature")
        box.clear()
        box.send_keys("0")
        driver.find_element(By.ID, "system").send_keys(args.system)
        for i, question in enumerate(args.questions.split("|")):
            driver.find_element(By.ID, "input").send_keys(question)
            driver.find_element(By.ID, "send").click()
            WebDriverWait(driver, 120).until(
                lambda d, n=i + 1: len(d.find_elements(By.CSS_SELECTOR, ".msg[data-done]")) == n
            )
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
