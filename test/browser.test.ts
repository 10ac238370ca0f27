// Browsers: Connect-Web (Connect and gRPC-Web) and the SignalR client in headless Chromium, the README's
// browser snippets run verbatim, and the demo page with two users. Needs Debian's chromium
// (/usr/bin/chromium): CI installs it and fails without it; elsewhere these tests are skipped loudly.
import fs from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import type { Browser, BrowserContext, Page } from "playwright-core";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { loadConfig } from "../src/config.js";
import { bundle, webDir } from "../web/build.js";
import { artifactsDir, CHROMIUM, consoleLine, haveChromium, launchChromium, StaticSite, watch, type WatchedPage } from "./support/browser.js";
import { parleyClient } from "./support/clients.js";
import { startTestServer, tokenFor, uniqueTenant, type TestServer } from "./support/server.js";

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), "..");
const chromiumFound = haveChromium();
const inCi = Boolean(process.env.CI);
if (!chromiumFound) {
  console.log(`!!! ${inCi ? "FAILING" : "SKIPPED"} browser tests: no Chromium at ${CHROMIUM} (apt-get install chromium; .ci/run does) !!!`);
}
const browserTest = chromiumFound ? test : test.skip;

let server: TestServer;
let devServer: TestServer | undefined;
/** The web app's origin, allowed by the server's PARLEY_CORS_ORIGINS. */
let site: StaticSite;
/** Another origin, not allowed. */
let stranger: StaticSite;
let browser: Browser | undefined;
const contexts: BrowserContext[] = [];

test.before(async () => {
  site = await StaticSite.start();
  stranger = await StaticSite.start();
  server = await startTestServer({
    PARLEY_CORS_ORIGINS: site.origin,
    PARLEY_SEND_RATE: "100000",
    PARLEY_SEND_BURST: "100000",
  });
  if (chromiumFound) browser = await launchChromium();
});
test.after.each(async () => {
  await Promise.all(contexts.splice(0).map((c) => c.close()));
});
test.after(async () => {
  await browser?.close();
  await server?.destroy();
  await devServer?.destroy();
  await site?.close();
  await stranger?.close();
});

/** A page in a fresh browser context (its own storage: one user). */
async function openPage(url?: string): Promise<WatchedPage> {
  const context = await browser!.newContext({ viewport: { width: 1100, height: 720 } });
  contexts.push(context);
  const watched = watch(await context.newPage());
  if (url) await watched.page.goto(url);
  return watched;
}

// ---- Connect-Web, driven through web/probe

let probeJs: Promise<string> | undefined;
const probeScript = () => (probeJs ??= bundle(path.join(webDir, "probe/probe.ts"), "probe.js").then((b) => b.js));

/** Calls window.parleyProbe[method](...args) in the page. */
function probe<T = any>(page: Page, method: string, ...args: unknown[]): Promise<T> {
  return page.evaluate(([m, a]) => (globalThis as any).parleyProbe[m as string](...(a as unknown[])), [method, args] as const);
}

async function probeEvent(page: Page, match: (event: any) => boolean, timeoutMs = 5000): Promise<any> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const event = await probe(page, "nextEvent", Math.max(1, deadline - Date.now()));
    if (match(event)) return event;
  }
}

for (const protocol of ["connect", "grpc-web"] as const) {
  browserTest(`browser - Connect-Web (${protocol} transport) from another origin: unary RPCs, then Subscribe gets Ready and another client's message`, async () => {
    const tenant = uniqueTenant("web");
    const { page } = await openPage(site.script("probe.js", await probeScript()));
    await page.waitForFunction(() => (globalThis as any).parleyProbe !== undefined);

    const ready = await probe(page, "start", server.url, await tokenFor(tenant, "alice"), protocol);
    assert.ok("ready" in ready, `first notification is Ready: ${JSON.stringify(ready)}`);

    const chat = await probe(page, "createChat", "From the browser", ["bob"]);
    assert.is(chat.name, "From the browser");
    assert.is(chat.memberCount, 2);
    const sent = await probe(page, "sendMessage", chat.id, "hello from Chromium");
    assert.is(sent.sequence, "1");
    assert.is(sent.senderId, "alice");

    // Another client (Node, gRPC) sends; the browser's stream delivers it with the full message.
    const bob = parleyClient(server.url, await tokenFor(tenant, "bob"), "grpc");
    await bob.messages.sendMessage({ chatId: chat.id, text: "hello from Node" });
    const created = await probeEvent(page, (e) => e.messageCreated?.senderId === "bob");
    assert.is(created.chatId, chat.id);
    assert.is(created.messageCreated.sequence, "2");
    assert.is(created.messageCreated.message.text, "hello from Node");

    const listed = await probe(page, "listMessages", chat.id);
    assert.equal(listed.messages.map((m: any) => [m.sequence, m.senderId, m.text]), [
      ["2", "bob", "hello from Node"],
      ["1", "alice", "hello from Chromium"],
    ]);

    // The protocol really was the one asked for (the probe records every request's content type).
    const requests: { path: string; contentType: string }[] = await page.evaluate(() => (globalThis as any).parleyProbe.requests);
    const types = new Set(requests.map((r) => `${r.path.split("/").pop()} ${r.contentType}`));
    const expected = protocol === "connect"
      ? ["Subscribe application/connect+json", "CreateChat application/json", "SendMessage application/json", "ListMessages application/json"]
      : ["Subscribe application/grpc-web+proto", "CreateChat application/grpc-web+proto", "SendMessage application/grpc-web+proto", "ListMessages application/grpc-web+proto"];
    for (const e of expected) assert.ok(types.has(e), `${e} in ${JSON.stringify([...types])}`);
    await probe(page, "stop");
  });
}

// ---- Google's grpc-web client, driven through web/probe/grpc-web-probe.ts

let grpcWebProbeJs: Promise<string> | undefined;
const grpcWebProbeScript = () => (grpcWebProbeJs ??= bundle(path.join(webDir, "probe/grpc-web-probe.ts"), "grpc-web-probe.js").then((b) => b.js));

browserTest("browser - Google's grpc-web client in text mode from another origin: CreateChat, then Subscribe gets Ready and a message", async () => {
  const tenant = uniqueTenant("web");
  const { page } = await openPage();
  const contentTypes = new Set<string>();
  page.on("request", (request) => {
    if (request.url().startsWith(server.url) && request.method() === "POST") contentTypes.add(request.headers()["content-type"] ?? "");
  });
  await page.goto(site.script("grpc-web-probe.js", await grpcWebProbeScript()));
  await page.waitForFunction(() => (globalThis as any).grpcWebProbe !== undefined);
  const call = <T = any>(name: string, ...args: unknown[]): Promise<T> =>
    page.evaluate(([m, a]) => (globalThis as any).grpcWebProbe[m as string](...(a as unknown[])), [name, args] as const);

  const ready = await call("start", server.url, await tokenFor(tenant, "alice"));
  assert.ok("ready" in ready, `first notification is Ready: ${JSON.stringify(ready)}`);
  const chat = await call("createChat", "grpc-web", ["bob"]);
  assert.is(chat.name, "grpc-web");
  assert.is(chat.memberCount, 2);
  const bob = parleyClient(server.url, await tokenFor(tenant, "bob"), "grpc");
  await bob.messages.sendMessage({ chatId: chat.id, text: "to a grpc-web stream" });
  let created: any;
  while (!created?.messageCreated) created = await call("nextEvent", 5000);
  assert.is(created.messageCreated.message.text, "to a grpc-web stream");
  assert.equal([...contentTypes], ["application/grpc-web-text"]);
  await call("stop");
});

browserTest("browser - Connect-Web from an origin not in PARLEY_CORS_ORIGINS gets no answer", async () => {
  const tenant = uniqueTenant("web");
  const { page } = await openPage(stranger.script("probe.js", await probeScript()));
  await page.waitForFunction(() => (globalThis as any).parleyProbe !== undefined);
  const failure = await probe(page, "start", server.url, await tokenFor(tenant, "alice"), "connect").then(
    () => undefined,
    (error: Error) => error.message,
  );
  assert.ok(failure, "Subscribe from a foreign origin must fail");
  const unary = await probe(page, "createChat", "x", []).then(() => undefined, (error: Error) => error.message);
  assert.ok(unary && /fetch/i.test(unary), `the browser blocks the call: ${unary}`);
  // The server still answers requests without an Origin (and the allowed origin, above).
  const alice = parleyClient(server.url, await tokenFor(tenant, "alice"));
  assert.is((await alice.chats.listChats({})).chats.length, 0);
});

// ---- the README's browser snippets, run verbatim

/** The ```ts block after `<!-- snippet: NAME -->` in README.md, with its placeholders filled in. */
async function readmeSnippet(name: string, values: Record<string, string>): Promise<string> {
  const readme = await fs.readFile(path.join(root, "README.md"), "utf8");
  const match = new RegExp(`<!-- snippet: ${name} -->\\s*\`\`\`ts\\n([\\s\\S]*?)\`\`\``).exec(readme);
  assert.ok(match, `README.md has a snippet named ${name}`);
  let code = match![1]!;
  for (const [placeholder, value] of Object.entries(values)) {
    assert.is(code.split(placeholder).length, 2, `${placeholder} occurs once in the ${name} snippet`);
    code = code.replace(placeholder, JSON.stringify(value));
  }
  return (await bundle({ contents: code, resolveDir: root }, `${name}.js`)).js;
}

browserTest("browser - the README's Connect-Web snippet runs: create, send, list, then live messages", async () => {
  const tenant = uniqueTenant("snippet");
  const js = await readmeSnippet("connect-web", {
    '"http://localhost:8080"': server.url,
    '"<JWT>"': await tokenFor(tenant, "alice"),
  });
  const watched = await openPage(site.script("snippet-connect-web.js", js));
  await consoleLine(watched, "#1 alice: hello from the browser");
  await consoleLine(watched, "log: live");
  const bob = parleyClient(server.url, await tokenFor(tenant, "bob"));
  const { chats } = await bob.chats.listChats({});
  assert.is(chats.length, 1);
  await bob.messages.sendMessage({ chatId: chats[0]!.id, text: "hello from bob" });
  await consoleLine(watched, `${chats[0]!.id} #2 bob: hello from bob`);
  assert.equal(watched.errors, []);
});

browserTest("browser - the README's SignalR snippet runs: Ready, SendMessage, MarkRead, then live messages", async () => {
  const tenant = uniqueTenant("snippet");
  const alice = parleyClient(server.url, await tokenFor(tenant, "alice"));
  const { chat } = await alice.chats.createChat({ name: "Hub", memberIds: ["bob"] });
  const js = await readmeSnippet("signalr", {
    '"http://localhost:8080"': server.url,
    '"<JWT>"': await tokenFor(tenant, "bob"),
    '"<chat id>"': chat!.id,
  });
  const watched = await openPage(site.script("snippet-signalr.js", js));
  await consoleLine(watched, "log: live");
  await consoleLine(watched, "sent #1");
  const { messages } = await alice.messages.listMessages({ chatId: chat!.id });
  assert.equal(messages.map((m) => [m.senderId, m.text]), [["bob", "hello from the hub"]]);
  const { chats } = await parleyClient(server.url, await tokenFor(tenant, "bob")).chats.listChats({});
  assert.is(chats[0]!.unreadCount, 0n);
  await alice.messages.sendMessage({ chatId: chat!.id, text: "hello from alice" });
  await consoleLine(watched, `${chat!.id} #2 alice: hello from alice`);
  assert.equal(watched.errors, []);
});

// ---- the demo page

async function waitText(page: Page, selector: string, text: string | RegExp, timeoutMs = 5000): Promise<void> {
  await page.locator(selector, { hasText: text }).first().waitFor({ timeout: timeoutMs });
}

/** Signs in through the token form, or with `/#token=`. */
async function demoAs(url: string, token: string, via: "form" | "fragment"): Promise<WatchedPage> {
  const watched = await openPage();
  const { page } = watched;
  if (via === "fragment") {
    await page.goto(`${url}/#token=${token}`);
  } else {
    await page.goto(`${url}/`);
    await page.fill("#signin-token", token);
    await page.click("#token-signin button[type=submit]");
  }
  await waitText(page, "#status", "live");
  return watched;
}

browserTest("browser - demo: A creates a chat with B and sends; B sees each message live within a second", async () => {
  const tenant = uniqueTenant("demo");
  const alice = await demoAs(server.url, await tokenFor(tenant, "alice"), "form");
  const bob = await demoAs(server.url, await tokenFor(tenant, "bob"), "fragment");
  const a = alice.page;
  const b = bob.page;
  assert.not.match(b.url(), /token=/, "the token is removed from the address bar");
  await waitText(a, "#whoami", `alice @ ${tenant}`);
  await waitText(b, "#whoami", `bob @ ${tenant}`);

  // A creates the chat; it appears in B's list (ChatCreated) without a reload.
  await a.fill("#new-chat-name", "Lunch");
  await a.fill("#new-chat-members", "bob");
  await a.click("#new-chat button[type=submit]");
  await waitText(a, "#chat-name", "Lunch");
  const bobsItem = b.locator(".chat-item", { hasText: "Lunch" });
  await bobsItem.waitFor({ timeout: 2000 });

  // While B has not opened it, A's first message shows as unread in B's list.
  await a.fill("#composer-text", "anyone hungry?");
  await a.press("#composer-text", "Enter");
  await waitText(a, ".message .text", "anyone hungry?");
  await bobsItem.locator(".unread", { hasText: "1" }).waitFor({ timeout: 2000 });

  // B opens the chat: the message is there and the unread count is gone.
  await bobsItem.click();
  await waitText(b, ".message .text", "anyone hungry?");
  await bobsItem.locator(".unread").waitFor({ state: "detached", timeout: 2000 });

  // The feature: A sends, B sees it within a second (measured from A pressing Enter to B's DOM).
  for (const text of ["pizza at noon?", "or sushi"]) {
    await a.fill("#composer-text", text);
    const shown = b.locator(".message .text", { hasText: text }).waitFor({ timeout: 1000 })
      .then(() => performance.now(), (error: Error) => error);
    const started = performance.now();
    await a.press("#composer-text", "Enter");
    const seen = await shown;
    assert.ok(!(seen instanceof Error), `B did not see "${text}" within a second: ${seen}`);
    const elapsed = (seen as number) - started;
    assert.ok(elapsed < 1000, `B saw "${text}" after ${elapsed.toFixed(0)} ms`);
    console.log(`  B saw "${text}" ${elapsed.toFixed(0)} ms after A pressed Enter`);
  }

  // And back: B replies, A sees it; B read everything, so A's own view has nothing unread.
  await b.fill("#composer-text", "sushi!");
  await b.press("#composer-text", "Enter");
  await waitText(a, ".message .text", "sushi!", 1000);
  assert.is(await b.locator(".message").count(), 4);
  assert.is(await b.locator(".message[data-mine=true]").count(), 1);
  assert.is(await a.locator(".chat-item .unread").count(), 0);

  await fs.mkdir(artifactsDir, { recursive: true });
  await b.screenshot({ path: path.join(artifactsDir, "demo-bob.png") });
  await a.screenshot({ path: path.join(artifactsDir, "demo-alice.png") });
  assert.equal([...alice.errors, ...bob.errors], []);
});

browserTest("browser - demo: pages back through history, adds and removes members", async () => {
  const tenant = uniqueTenant("demo");
  const api = parleyClient(server.url, await tokenFor(tenant, "alice"));
  const { chat } = await api.chats.createChat({ name: "History", memberIds: ["bob"] });
  for (let i = 1; i <= 45; i++) await api.messages.sendMessage({ chatId: chat!.id, text: `message ${i}` });

  const { page, errors } = await demoAs(server.url, await tokenFor(tenant, "alice"), "fragment");
  await page.locator(".chat-item", { hasText: "History" }).click();
  await waitText(page, ".message .text", "message 45");
  assert.is(await page.locator(".message").count(), 30, "the newest page");
  assert.is(await page.locator(".message .text").first().textContent(), "message 16");
  await page.click("#load-older");
  await waitText(page, ".message .text", /^message 1$/);
  assert.is(await page.locator(".message").count(), 45);
  assert.is(await page.locator(".message .text").first().textContent(), "message 1");
  assert.ok(await page.locator("#load-older").isHidden(), "nothing older is left");

  const memberIds = async () => (await api.members.listMembers({ chatId: chat!.id })).members.map((m) => m.userId);
  await page.click("#member-count");
  await page.fill("#add-member-ids", "carol, dave");
  await page.click("#add-member button[type=submit]");
  await waitText(page, "#members .member", "dave");
  assert.equal(await memberIds(), ["alice", "bob", "carol", "dave"]);
  await waitText(page, "#member-count", "4 members");
  await page.click('#members .remove-member[data-user-id="dave"]');
  await page.locator('#members .member[data-user-id="dave"]').waitFor({ state: "detached" });
  assert.equal(await memberIds(), ["alice", "bob", "carol"]);

  // Leaving closes the chat and drops it from the list.
  await page.click('#members .remove-member[data-user-id="alice"]');
  await page.locator(".chat-item", { hasText: "History" }).waitFor({ state: "detached" });
  assert.ok(await page.locator("#chat").isHidden());
  assert.equal(errors, []);
});

async function startDevServer(): Promise<TestServer> {
  // No PARLEY_JWT_SECRET: development mode with a generated secret, as after `npm start`.
  devServer ??= await startTestServer({ PARLEY_JWT_SECRET: "" });
  return devServer;
}

browserTest("browser - demo in development mode: sign in with tenant and user", async () => {
  const dev = await startDevServer();
  const tenant = uniqueTenant("dev");
  const { page, errors } = await openPage(`${dev.url}/`);
  await page.locator("#dev-signin").waitFor();
  await page.fill("#signin-tenant", tenant);
  await page.fill("#signin-user", "carol");
  await page.click("#dev-signin button[type=submit]");
  await waitText(page, "#status", "live");
  await waitText(page, "#whoami", `carol @ ${tenant}`);
  await page.fill("#new-chat-name", "Dev chat");
  await page.click("#new-chat button[type=submit]");
  await waitText(page, ".chat-item", "Dev chat");
  // Signing out forgets the token.
  await page.click("#sign-out");
  await page.locator("#dev-signin").waitFor();
  await page.reload();
  await page.locator("#dev-signin").waitFor();
  assert.equal(errors, []);
});

if (!chromiumFound && inCi) {
  test("browser - Chromium is installed (CI)", () => {
    assert.unreachable(`no Chromium at ${CHROMIUM}: .ci/run installs Debian's chromium package before the suites`);
  });
}

// ---- what needs no browser: where the demo and its token endpoint exist

test("browser - PARLEY_DEMO: on by default in development, off in production, on|off only", () => {
  const secret = { PARLEY_JWT_SECRET: "x".repeat(32) };
  assert.equal(loadConfig({}).demo, { enabled: true, devTokens: true });
  assert.equal(loadConfig({ PARLEY_DEMO: "off" }).demo, { enabled: false, devTokens: false });
  assert.equal(loadConfig(secret).demo, { enabled: true, devTokens: false });
  assert.equal(loadConfig({ PARLEY_JWKS_FILE: "keys.json" }).demo, { enabled: true, devTokens: false });
  assert.equal(loadConfig({ ...secret, NODE_ENV: "production" }).demo, { enabled: false, devTokens: false });
  assert.equal(loadConfig({ ...secret, NODE_ENV: "production", PARLEY_DEMO: "on" }).demo, { enabled: true, devTokens: false });
  assert.throws(() => loadConfig({ PARLEY_DEMO: "yes" }), /PARLEY_DEMO must be on or off/);
});

async function post(url: string, body: unknown, contentType = "application/json"): Promise<Response> {
  return fetch(url, { method: "POST", headers: { "content-type": contentType }, body: JSON.stringify(body) });
}

test("browser - POST /demo/token signs tokens only in development mode", async () => {
  const dev = await startDevServer();
  const tenant = uniqueTenant("dev");
  assert.equal(await (await fetch(`${dev.url}/demo/config.json`)).json(), { devTokens: true });
  const res = await post(`${dev.url}/demo/token`, { tenant, user: "dave" });
  assert.is(res.status, 200);
  assert.is(res.headers.get("access-control-allow-origin"), null, "no CORS: other sites cannot read tokens");
  const { token } = (await res.json()) as { token: string };
  const { chat } = await parleyClient(dev.url, token).chats.createChat({ name: "made with a demo token" });
  assert.is(chat!.creatorId, "dave");
  assert.is((await post(`${dev.url}/demo/token`, { tenant: "bad tenant", user: "dave" })).status, 400);
  assert.is((await post(`${dev.url}/demo/token`, { tenant, user: "" })).status, 400);
  assert.is((await post(`${dev.url}/demo/token`, { tenant, user: "dave" }, "text/plain")).status, 415);
  assert.is((await fetch(`${dev.url}/demo/token`)).status, 405);

  // With a key configured (the test server has PARLEY_JWT_SECRET) the endpoint does not exist.
  assert.is((await post(`${server.url}/demo/token`, { tenant, user: "dave" })).status, 404);
  assert.equal(await (await fetch(`${server.url}/demo/config.json`)).json(), { devTokens: false });
  const page = await fetch(`${server.url}/`);
  assert.is(page.status, 200, "the page itself is served (sign in with a token)");
  assert.match(page.headers.get("content-security-policy") ?? "", /default-src 'self'/);
  assert.match(await page.text(), /<script type="module" src="\/demo\/app.js">/);
  const script = await fetch(`${server.url}/demo/app.js`);
  assert.is(script.status, 200);
  assert.match(script.headers.get("content-type") ?? "", /^text\/javascript/);
  assert.is((await fetch(`${server.url}/demo/app.js`, { headers: { "if-none-match": script.headers.get("etag")! } })).status, 304);
  assert.is((await fetch(`${server.url}/demo/nothing.js`)).status, 404);

  // Production with the demo switched on: the page, never the token endpoint.
  const production = await startTestServer({ NODE_ENV: "production", PARLEY_DEMO: "on" });
  try {
    assert.is((await fetch(`${production.url}/`)).status, 200);
    assert.is((await post(`${production.url}/demo/token`, { tenant, user: "dave" })).status, 404);
  } finally {
    await production.destroy();
  }
});

test.run();
