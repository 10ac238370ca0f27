import fs from "node:fs";
import http from "node:http";
import type net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium, type Browser, type Page } from "playwright-core";

/** Debian's chromium (CI installs it in .ci/run); PARLEY_TEST_CHROMIUM points elsewhere. */
export const CHROMIUM = process.env.PARLEY_TEST_CHROMIUM || "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
  "--no-first-run", "--disable-component-update", "--disable-sync",
];

export const artifactsDir = path.join(path.dirname(fileURLToPath(import.meta.url)), "../artifacts");

export function haveChromium(): boolean {
  try {
    fs.accessSync(CHROMIUM, fs.constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

/** Headless Chromium; Playwright gives every launch a fresh, temporary user-data-dir. */
export function launchChromium(): Promise<Browser> {
  return chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
}

/** A page whose console output and uncaught errors are kept, to read in assertions and failures. */
export interface WatchedPage {
  page: Page;
  console: string[];
  errors: string[];
}

export function watch(page: Page): WatchedPage {
  const watched: WatchedPage = { page, console: [], errors: [] };
  page.on("console", (message) => watched.console.push(`${message.type()}: ${message.text()}`));
  page.on("pageerror", (error) => watched.errors.push(String(error)));
  return watched;
}

/** Waits until a console line contains `text`. */
export async function consoleLine(watched: WatchedPage, text: string, timeoutMs = 5000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const line = watched.console.find((l) => l.includes(text));
    if (line) return line;
    if (Date.now() > deadline) {
      throw new Error(`no console line with "${text}" within ${timeoutMs} ms; console: ${JSON.stringify(watched.console)}; errors: ${JSON.stringify(watched.errors)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/**
 * A static web site on its own loopback port: a different origin from the Parley server, as a real
 * web app would be. `/page/<script>` is an HTML page that loads `/<script>` as a module.
 */
export class StaticSite {
  private readonly files = new Map<string, { contentType: string; body: string }>();

  private constructor(private readonly server: http.Server, readonly origin: string) {}

  static async start(): Promise<StaticSite> {
    let site: StaticSite | undefined;
    const server = http.createServer((req, res) => {
      const urlPath = (req.url ?? "/").split("?", 1)[0]!;
      const page = /^\/page\/([\w.-]+\.js)$/.exec(urlPath);
      const file = page
        ? { contentType: "text/html", body: `<!doctype html><meta charset="utf-8"><title>${page[1]}</title><script type="module" src="/${page[1]}"></script>` }
        : site!.files.get(urlPath);
      res.writeHead(file ? 200 : 404, { "content-type": file?.contentType ?? "text/plain", "cache-control": "no-store" });
      res.end(file?.body ?? "not found");
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", () => resolve()));
    site = new StaticSite(server, `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`);
    return site;
  }

  script(name: string, js: string): string {
    this.files.set(`/${name}`, { contentType: "text/javascript", body: js });
    return `${this.origin}/page/${name}`;
  }

  close(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}
