// Authentication against the contract (/work/shared/api.md, "Authentication and tenancy"):
// which tokens are UNAUTHENTICATED, which keys are accepted, and how the server starts without a key.
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Code, ConnectError, createClient, type Interceptor, type Transport } from "@connectrpc/connect";
import { createConnectTransport, createGrpcTransport } from "@connectrpc/connect-node";
import { exportJWK, exportSPKI, generateKeyPair, SignJWT, type JWTPayload } from "jose";
import { test } from "uvu";
import * as assert from "uvu/assert";
import { ChatService } from "../gen/parley/v1/chat_pb.js";
import { MessageService } from "../gen/parley/v1/message_pb.js";
import { NotificationService } from "../gen/parley/v1/notification_pb.js";
import { loadConfig } from "../src/config.js";
import { parleyClient } from "./support/clients.js";
import { startTestServer, TEST_SECRET, tokenFor, uniqueTenant, type TestServer } from "./support/server.js";

const repoDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");

const ISSUER = "https://issuer.parley.test/";
const AUDIENCE = "parley-api-test";

// ---------------------------------------------------------------------------------------------
// Helpers

type Outcome = "ok" | keyof typeof Code;

function codeName(code: Code): keyof typeof Code {
  return Code[code] as keyof typeof Code;
}

async function outcome(promise: Promise<unknown>): Promise<Outcome> {
  try {
    await promise;
    return "ok";
  } catch (error) {
    return codeName(ConnectError.from(error).code);
  }
}

/** A transport that sends `authorization` exactly as given (or not at all). */
function rawAuthTransport(baseUrl: string, authorization: string | undefined, protocol: "connect" | "grpc"): Transport {
  const interceptors: Interceptor[] = [
    (next) => (req) => {
      if (authorization !== undefined) req.header.set("authorization", authorization);
      return next(req);
    },
  ];
  return protocol === "grpc"
    ? createGrpcTransport({ baseUrl, interceptors })
    : createConnectTransport({ baseUrl, httpVersion: "1.1", interceptors });
}

/** ListChats with the given authorization header over the Connect protocol (HTTP/1.1) and gRPC. */
async function listChatsOutcomes(baseUrl: string, authorization: string | undefined): Promise<{ connect: Outcome; grpc: Outcome }> {
  const connect = createClient(ChatService, rawAuthTransport(baseUrl, authorization, "connect"));
  const grpc = createClient(ChatService, rawAuthTransport(baseUrl, authorization, "grpc"));
  return {
    connect: await outcome(connect.listChats({})),
    grpc: await outcome(grpc.listChats({})),
  };
}

async function expectUnauthenticated(baseUrl: string, authorization: string | undefined, what: string) {
  const got = await listChatsOutcomes(baseUrl, authorization);
  assert.equal(got, { connect: "Unauthenticated", grpc: "Unauthenticated" }, `${what}: ${JSON.stringify(got)}`);
}

async function expectAccepted(baseUrl: string, token: string, what: string) {
  const got = await listChatsOutcomes(baseUrl, `Bearer ${token}`);
  assert.equal(got, { connect: "ok", grpc: "ok" }, `${what}: ${JSON.stringify(got)}`);
}

function b64url(value: unknown): string {
  return Buffer.from(typeof value === "string" ? value : JSON.stringify(value)).toString("base64url");
}

const now = () => Math.floor(Date.now() / 1000);

/** An HS256 token with exactly these claims (nothing added). */
async function hs256(payload: JWTPayload, secret: string | Uint8Array = TEST_SECRET, header: Record<string, unknown> = {}): Promise<string> {
  const key = typeof secret === "string" ? new TextEncoder().encode(secret) : secret;
  return new SignJWT(payload).setProtectedHeader({ alg: "HS256", typ: "JWT", ...header }).sign(key);
}

function validClaims(extra: Record<string, unknown> = {}): JWTPayload {
  return { sub: "alice", tid: uniqueTenant("auth"), iat: now(), exp: now() + 3600, ...extra };
}

// ---------------------------------------------------------------------------------------------
// Servers: HS256 (default), JWKS (no secret), HS256 with issuer and audience.

type CryptoKey = Awaited<ReturnType<typeof generateKeyPair>>["privateKey"];

interface KeyPairs {
  rsa: { kid: string; privateKey: CryptoKey; publicKey: CryptoKey };
  ec: { kid: string; privateKey: CryptoKey; publicKey: CryptoKey };
  ed: { kid: string; privateKey: CryptoKey; publicKey: CryptoKey };
}

let hsServer: TestServer;
let jwksServer: TestServer;
let issServer: TestServer;
let keys: KeyPairs;
let jwksDir: string;

test.before(async () => {
  jwksDir = await fs.mkdtemp(path.join(os.tmpdir(), "parley-auth-jwks-"));
  const [rsa, ec, ed] = await Promise.all([generateKeyPair("RS256"), generateKeyPair("ES256"), generateKeyPair("EdDSA")]);
  keys = {
    rsa: { kid: "rsa-key-1", ...rsa },
    ec: { kid: "ec-key-1", ...ec },
    ed: { kid: "ed-key-1", ...ed },
  };
  const jwks = {
    keys: [
      { ...(await exportJWK(rsa.publicKey)), kid: keys.rsa.kid, alg: "RS256", use: "sig" },
      { ...(await exportJWK(ec.publicKey)), kid: keys.ec.kid, alg: "ES256", use: "sig" },
      { ...(await exportJWK(ed.publicKey)), kid: keys.ed.kid, alg: "EdDSA", use: "sig" },
    ],
  };
  const jwksFile = path.join(jwksDir, "jwks.json");
  await fs.writeFile(jwksFile, JSON.stringify(jwks, null, 2));
  // One after the other: parallel starts of the embedded database time out on a loaded machine.
  const configs: Record<string, string>[] = [
    {},
    { PARLEY_JWKS_FILE: jwksFile, PARLEY_JWT_SECRET: "" },
    { PARLEY_JWT_ISSUER: ISSUER, PARLEY_JWT_AUDIENCE: AUDIENCE },
  ];
  const started: TestServer[] = [];
  try {
    for (const env of configs) started.push(await startTestServer(env));
  } catch (error) {
    // Do not leave the others running: the process would never exit.
    await Promise.allSettled(started.map((s) => s.destroy()));
    await fs.rm(jwksDir, { recursive: true, force: true });
    console.error("server start failed:", error);
    throw error;
  }
  [hsServer, jwksServer, issServer] = started as [TestServer, TestServer, TestServer];
});

test.after(async () => {
  await Promise.allSettled([hsServer?.destroy(), jwksServer?.destroy(), issServer?.destroy()]);
  await fs.rm(jwksDir, { recursive: true, force: true });
  await killAllChildren();
});

// ---------------------------------------------------------------------------------------------
// HS256: valid token

test("auth - a valid HS256 token is accepted and its sub is the caller", async () => {
  const tenant = uniqueTenant("auth");
  const token = await tokenFor(tenant, "alice");
  await expectAccepted(hsServer.url, token, "valid HS256 token");
  const client = parleyClient(hsServer.url, token);
  const { chat } = await client.chats.createChat({ name: "mine", memberIds: [] });
  assert.is(chat!.creatorId, "alice");
  const { chats } = await client.chats.listChats({});
  assert.equal(chats.map((c) => c.id), [chat!.id]);
});

// ---------------------------------------------------------------------------------------------
// Missing or malformed authorization header

test("auth - no authorization header is UNAUTHENTICATED", async () => {
  await expectUnauthenticated(hsServer.url, undefined, "no header");
});

test("auth - every Parley RPC requires a token (unary, Connect JSON)", async () => {
  const rpcs = [
    "parley.v1.ChatService/CreateChat",
    "parley.v1.ChatService/ListChats",
    "parley.v1.ChatService/GetChat",
    "parley.v1.ChatService/MarkRead",
    "parley.v1.MemberService/ListMembers",
    "parley.v1.MemberService/AddMembers",
    "parley.v1.MemberService/RemoveMember",
    "parley.v1.MessageService/SendMessage",
    "parley.v1.MessageService/ListMessages",
    "parley.v1.MessageService/GetMessage",
  ];
  const failures: string[] = [];
  for (const rpc of rpcs) {
    for (const authorization of [undefined, "Bearer nope"]) {
      const headers: Record<string, string> = { "content-type": "application/json" };
      if (authorization) headers.authorization = authorization;
      const response = await fetch(`${hsServer.url}/${rpc}`, { method: "POST", headers, body: "{}" });
      const body = await response.text();
      let code = "";
      try {
        code = JSON.parse(body).code;
      } catch {}
      if (response.status !== 401 || code !== "unauthenticated") {
        failures.push(`${rpc} (${authorization ?? "no header"}): HTTP ${response.status} ${body.slice(0, 200)}`);
      }
    }
  }
  assert.equal(failures, []);
});

test("auth - streaming RPCs require a token", async () => {
  const transport = rawAuthTransport(hsServer.url, undefined, "grpc");
  const messages = createClient(MessageService, transport);
  const notifications = createClient(NotificationService, transport);
  const drain = async (stream: AsyncIterable<unknown>) => {
    for await (const _ of stream) {
      // Nothing may arrive before the error.
      throw new Error("a stream without a token produced a message");
    }
  };
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), 10_000);
  try {
    assert.is(await outcome(drain(messages.watchMessages({ chatId: "x" }, { signal: controller.signal }))), "Unauthenticated");
    assert.is(await outcome(drain(notifications.subscribe({}, { signal: controller.signal }))), "Unauthenticated");
  } finally {
    clearTimeout(timer);
  }
});

test("auth - a scheme other than Bearer is UNAUTHENTICATED", async () => {
  const token = await tokenFor(uniqueTenant("auth"), "alice");
  for (const header of [`Basic ${Buffer.from("alice:pw").toString("base64")}`, `Token ${token}`, token, "Bearer", "Bearer ", `Bearer${token}`]) {
    await expectUnauthenticated(hsServer.url, header, `authorization: ${header.slice(0, 30)}`);
  }
});

test("auth - garbage tokens are UNAUTHENTICATED", async () => {
  const valid = await tokenFor(uniqueTenant("auth"), "alice");
  const [h, p] = valid.split(".");
  for (const garbage of ["garbage", "a.b.c", "...", "e30.e30.", `${h}.${p}`, `${h}.${p}.`, `${h}.!!!.${valid.split(".")[2]}`, `${valid}.x`, "ey" + "A".repeat(300)]) {
    await expectUnauthenticated(hsServer.url, `Bearer ${garbage}`, `garbage token ${garbage.slice(0, 40)}`);
  }
});

test("auth - alg none tokens are UNAUTHENTICATED", async () => {
  const claims = validClaims();
  for (const alg of ["none", "None", "NONE"]) {
    const unsigned = `${b64url({ alg, typ: "JWT" })}.${b64url(claims)}.`;
    await expectUnauthenticated(hsServer.url, `Bearer ${unsigned}`, `alg ${alg}`);
    // Same, with the signature of a real HS256 token attached.
    const real = await hs256(claims);
    await expectUnauthenticated(hsServer.url, `Bearer ${b64url({ alg, typ: "JWT" })}.${b64url(claims)}.${real.split(".")[2]}`, `alg ${alg} + sig`);
  }
});

test("auth - a token signed with another secret is UNAUTHENTICATED", async () => {
  const token = await hs256(validClaims(), "another-secret-that-is-long-enough-0123456789");
  await expectUnauthenticated(hsServer.url, `Bearer ${token}`, "wrong secret");
});

test("auth - a token whose payload was changed after signing is UNAUTHENTICATED", async () => {
  const token = await hs256(validClaims({ tid: "tenant-one" }));
  const [h, , s] = token.split(".");
  const forged = `${h}.${b64url(validClaims({ tid: "tenant-two" }))}.${s}`;
  await expectUnauthenticated(hsServer.url, `Bearer ${forged}`, "tampered payload");
});

test("auth - an expired token is UNAUTHENTICATED", async () => {
  const token = await hs256(validClaims({ iat: now() - 7200, exp: now() - 3600 }));
  await expectUnauthenticated(hsServer.url, `Bearer ${token}`, "expired");
});

test("auth - a token with nbf in the future is UNAUTHENTICATED", async () => {
  const token = await hs256(validClaims({ nbf: now() + 3600 }));
  await expectUnauthenticated(hsServer.url, `Bearer ${token}`, "nbf in the future");
  const ok = await hs256(validClaims({ nbf: now() - 60 }));
  await expectAccepted(hsServer.url, ok, "nbf in the past");
});

test("auth - missing or invalid sub is UNAUTHENTICATED", async () => {
  const cases: [string, Record<string, unknown>][] = [
    ["missing", { sub: undefined }],
    ["empty", { sub: "" }],
    ["129 chars", { sub: "u".repeat(129) }],
    ["1000 chars", { sub: "u".repeat(1000) }],
    ["NUL", { sub: "ali\u0000ce" }],
    ["newline", { sub: "alice\n" }],
    ["tab", { sub: "al\tice" }],
    ["escape", { sub: "\u001b[31malice" }],
    ["DEL", { sub: "alice\u007f" }],
    ["C1 control", { sub: "alice\u0085" }],
    ["number", { sub: 12345 }],
    ["array", { sub: ["alice"] }],
  ];
  for (const [what, extra] of cases) {
    const claims = validClaims(extra);
    if (extra.sub === undefined) delete claims.sub;
    await expectUnauthenticated(hsServer.url, `Bearer ${await hs256(claims)}`, `sub ${what}`);
  }
});

test("auth - sub may be any string of 1 to 128 characters without control characters", async () => {
  for (const sub of ["a", "u".repeat(128), "Ünïcødé 用户 🙂", "a.b*c>d e", "../etc/passwd", "user@example.com"]) {
    const token = await hs256(validClaims({ sub }));
    await expectAccepted(hsServer.url, token, `sub ${JSON.stringify(sub)}`);
    const { chat } = await parleyClient(hsServer.url, token).chats.createChat({ name: "x" });
    assert.is(chat!.creatorId, sub, "the user id is the sub claim, verbatim");
  }
});

test("auth - missing or invalid tid is UNAUTHENTICATED", async () => {
  const cases: [string, unknown][] = [
    ["missing", undefined],
    ["a.b", "a.b"],
    ["*", "*"],
    [">", ">"],
    ["../x", "../x"],
    ["empty", ""],
    ["64 chars", "t".repeat(64)],
    ["200 chars", "t".repeat(200)],
    ["leading -", "-abc"],
    ["leading _", "_abc"],
    ["space", "a b"],
    ["trailing newline", "abc\n"],
    ["non-ASCII", "tenänt"],
    ["slash", "a/b"],
    ["number", 42],
    ["array", ["abc"]],
  ];
  for (const [what, tid] of cases) {
    const claims = validClaims({ tid });
    if (tid === undefined) delete claims.tid;
    await expectUnauthenticated(hsServer.url, `Bearer ${await hs256(claims)}`, `tid ${what}`);
  }
});

test("auth - tid matching ^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$ is accepted", async () => {
  for (const tid of ["a", "9", "T".repeat(63), "Acme_Corp-01", "x-_-_"]) {
    await expectAccepted(hsServer.url, await hs256(validClaims({ tid })), `tid ${tid}`);
  }
});

test("auth - a huge token (100 KB) is UNAUTHENTICATED over Connect (HTTP/1.1) and gRPC", async () => {
  const claims = validClaims({ padding: "p".repeat(100 * 1024) });
  const huge = await hs256(claims, "another-secret-that-is-long-enough-0123456789");
  assert.ok(huge.length > 100 * 1024);
  const problems: string[] = [];
  for (const [what, token] of [["100 KB signed token", huge], ["100 KB garbage", "A".repeat(100 * 1024)]] as const) {
    // Connect JSON over HTTP/1.1, as curl would send it.
    const response = await fetch(`${hsServer.url}/parley.v1.ChatService/ListChats`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
      body: "{}",
    });
    const body = await response.text();
    if (response.status !== 401 || !body.includes('"unauthenticated"')) problems.push(`${what}, Connect/HTTP 1.1: HTTP ${response.status} ${body.slice(0, 100)}`);
    // gRPC over HTTP/2. Node's HTTP/2 client refuses to send header blocks over 64 KiB
    // (maxSendHeaderBlockLength), so this side uses the largest token it can send.
    const grpcToken = token.slice(0, 60 * 1024);
    const grpc = await outcome(createClient(ChatService, rawAuthTransport(hsServer.url, `Bearer ${grpcToken}`, "grpc")).listChats({}));
    if (grpc !== "Unauthenticated") problems.push(`${what}, gRPC: ${grpc}`);
  }
  assert.equal(problems, []);
});

test("auth - the server keeps working after a huge token", async () => {
  await outcome(createClient(ChatService, rawAuthTransport(hsServer.url, `Bearer ${"A".repeat(100 * 1024)}`, "grpc")).listChats({}));
  await outcome(createClient(ChatService, rawAuthTransport(hsServer.url, `Bearer ${"A".repeat(100 * 1024)}`, "connect")).listChats({}));
  await expectAccepted(hsServer.url, await tokenFor(uniqueTenant("auth"), "alice"), "after huge tokens");
});

// ---------------------------------------------------------------------------------------------
// JWKS

async function signWith(key: { kid: string; privateKey: CryptoKey }, alg: string, claims: JWTPayload = validClaims()): Promise<string> {
  return new SignJWT(claims).setProtectedHeader({ alg, kid: key.kid, typ: "JWT" }).sign(key.privateKey);
}

test("auth - JWKS: RS256, ES256 and EdDSA tokens are accepted", async () => {
  const tenant = uniqueTenant("jwks");
  for (const [key, alg] of [[keys.rsa, "RS256"], [keys.ec, "ES256"], [keys.ed, "EdDSA"]] as const) {
    const token = await signWith(key, alg, validClaims({ tid: tenant, sub: `user-${alg}` }));
    await expectAccepted(jwksServer.url, token, alg);
    const { chat } = await parleyClient(jwksServer.url, token, "grpc").chats.createChat({ name: alg });
    assert.is(chat!.creatorId, `user-${alg}`);
  }
});

test("auth - JWKS: an unknown kid is UNAUTHENTICATED", async () => {
  const stranger = await generateKeyPair("RS256");
  const token = await signWith({ kid: "unknown-kid", privateKey: stranger.privateKey }, "RS256");
  await expectUnauthenticated(jwksServer.url, `Bearer ${token}`, "unknown kid");
});

test("auth - JWKS: a known kid with a signature by another key is UNAUTHENTICATED", async () => {
  const stranger = await generateKeyPair("RS256");
  const token = await signWith({ kid: keys.rsa.kid, privateKey: stranger.privateKey }, "RS256");
  await expectUnauthenticated(jwksServer.url, `Bearer ${token}`, "known kid, foreign key");
  const strangerEc = await generateKeyPair("ES256");
  const token2 = await signWith({ kid: keys.ec.kid, privateKey: strangerEc.privateKey }, "ES256");
  await expectUnauthenticated(jwksServer.url, `Bearer ${token2}`, "known EC kid, foreign key");
});

test("auth - JWKS: HS256 signed with the RSA public key (algorithm confusion) is UNAUTHENTICATED", async () => {
  const pem = await exportSPKI(keys.rsa.publicKey);
  const jwk = await exportJWK(keys.rsa.publicKey);
  const secrets: [string, string | Uint8Array][] = [
    ["PEM", pem],
    ["PEM without trailing newline", pem.trim()],
    ["DER", new Uint8Array(Buffer.from(pem.replace(/-----[^-]+-----|\s/g, ""), "base64"))],
    ["JWK JSON", JSON.stringify({ ...jwk, kid: keys.rsa.kid, alg: "RS256", use: "sig" })],
    ["modulus n", jwk.n!],
  ];
  for (const [what, secret] of secrets) {
    for (const kid of [keys.rsa.kid, undefined]) {
      const token = await hs256(validClaims(), secret, kid ? { kid } : {});
      await expectUnauthenticated(jwksServer.url, `Bearer ${token}`, `HS256 with RSA public key as ${what}, kid ${kid}`);
    }
  }
});

test("auth - JWKS: with no secret configured, HS256 tokens and alg none are UNAUTHENTICATED", async () => {
  await expectUnauthenticated(jwksServer.url, `Bearer ${await tokenFor(uniqueTenant("jwks"), "alice")}`, "HS256 with the test secret");
  await expectUnauthenticated(jwksServer.url, `Bearer ${await hs256(validClaims(), "x".repeat(32))}`, "HS256 with an arbitrary secret");
  await expectUnauthenticated(jwksServer.url, `Bearer ${b64url({ alg: "none", kid: keys.rsa.kid })}.${b64url(validClaims())}.`, "alg none");
});

test("auth - JWKS: expired, bad sub and bad tid are still UNAUTHENTICATED", async () => {
  const cases: JWTPayload[] = [
    validClaims({ exp: now() - 3600 }),
    validClaims({ sub: "" }),
    validClaims({ tid: "a.b" }),
    validClaims({ nbf: now() + 3600 }),
  ];
  for (const claims of cases) {
    await expectUnauthenticated(jwksServer.url, `Bearer ${await signWith(keys.ed, "EdDSA", claims)}`, JSON.stringify(claims));
  }
});

// ---------------------------------------------------------------------------------------------
// Issuer and audience

test("auth - issuer and audience: the right iss and aud are accepted", async () => {
  await expectAccepted(issServer.url, await hs256(validClaims({ iss: ISSUER, aud: AUDIENCE })), "right iss and aud");
  await expectAccepted(issServer.url, await hs256(validClaims({ iss: ISSUER, aud: ["other-api", AUDIENCE] })), "aud array containing ours");
});

test("auth - issuer and audience: wrong or missing iss or aud is UNAUTHENTICATED", async () => {
  const cases: [string, Record<string, unknown>][] = [
    ["wrong iss", { iss: "https://evil.example/", aud: AUDIENCE }],
    ["iss prefix", { iss: ISSUER.slice(0, -1), aud: AUDIENCE }],
    ["missing iss", { aud: AUDIENCE }],
    ["wrong aud", { iss: ISSUER, aud: "other-api" }],
    ["aud array without ours", { iss: ISSUER, aud: ["other-api", "third"] }],
    ["missing aud", { iss: ISSUER }],
    ["neither", {}],
  ];
  for (const [what, extra] of cases) {
    await expectUnauthenticated(issServer.url, `Bearer ${await hs256(validClaims(extra))}`, what);
  }
});

test("auth - without issuer/audience configured, iss and aud are not required", async () => {
  await expectAccepted(hsServer.url, await hs256(validClaims({ iss: "anyone", aud: "anything" })), "any iss/aud");
  await expectAccepted(hsServer.url, await hs256(validClaims()), "no iss/aud");
});

// ---------------------------------------------------------------------------------------------
// Start-up: development mode, production without a key, a bad DATABASE_URL

const children = new Set<ChildProcess>();

async function killAllChildren() {
  for (const child of children) await killChild(child);
}

async function killChild(child: ChildProcess) {
  if (child.exitCode !== null || child.signalCode !== null) {
    children.delete(child);
    return;
  }
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  child.kill("SIGTERM");
  const timer = setTimeout(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  }, 5000);
  await exited;
  clearTimeout(timer);
  children.delete(child);
}

/** The environment of a fresh child: nothing of Parley's configuration inherited from ours. */
function childEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [name, value] of Object.entries(process.env)) {
    if (name.startsWith("PARLEY_") || name === "DATABASE_URL" || name === "NATS_URL" || name === "NODE_ENV") continue;
    env[name] = value;
  }
  return { ...env, NO_COLOR: "1", ...extra };
}

interface Spawned {
  child: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

function spawnNode(args: string[], env: NodeJS.ProcessEnv): Spawned {
  const child = spawn(process.execPath, ["--import", "tsx", ...args], { cwd: repoDir, env, stdio: ["ignore", "pipe", "pipe"] });
  children.add(child);
  let out = "";
  let err = "";
  child.stdout!.on("data", (d) => (out += d));
  child.stderr!.on("data", (d) => (err += d));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once("close", (code, signal) => {
      children.delete(child);
      resolve({ code, signal });
    }),
  );
  return { child, stdout: () => out, stderr: () => err, exit };
}

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms))),
  ]);
}

/** Waits for the JSON log line "parley listening" and returns its port. */
async function listeningPort(spawned: Spawned, ms = 60_000): Promise<number> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    for (const line of spawned.stdout().split("\n")) {
      if (!line.includes("parley listening")) continue;
      try {
        const entry = JSON.parse(line);
        if (typeof entry.port === "number" && entry.port > 0) return entry.port;
      } catch {}
    }
    if (spawned.child.exitCode !== null) {
      throw new Error(`server exited with ${spawned.child.exitCode}: ${spawned.stderr()} ${spawned.stdout()}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`no "parley listening" line within ${ms} ms; stdout: ${spawned.stdout().slice(0, 2000)} stderr: ${spawned.stderr().slice(0, 2000)}`);
}

async function listFilesRecursive(dir: string, depth = 2): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await fs.readdir(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isFile()) out.push(full);
    else if (entry.isDirectory() && depth > 0) out.push(...(await listFilesRecursive(full, depth - 1)));
  }
  return out;
}

function nonEmptyLines(text: string): string[] {
  return text.split("\n").map((l) => l.trim()).filter((l) => l !== "");
}

test("auth - development mode: no key and no NODE_ENV starts, creates a secret, and npm run token tokens work", async () => {
  const dataDir = await fs.mkdtemp(path.join(os.tmpdir(), "parley-auth-dev-"));
  const env = childEnv({ PARLEY_PORT: "0", PARLEY_HOST: "127.0.0.1", PARLEY_DATA_DIR: dataDir, PARLEY_LOG_LEVEL: "info" });
  const server = spawnNode(["src/main.ts"], env);
  try {
    const port = await listeningPort(server);
    const url = `http://127.0.0.1:${port}`;

    // It logged that it created a secret, and the secret is in the data directory.
    const logged = nonEmptyLines(server.stdout() + "\n" + server.stderr()).filter((l) => /secret/i.test(l));
    assert.ok(logged.length > 0, `no log line mentions the generated secret:\n${server.stdout().slice(0, 3000)}`);
    const files = await listFilesRecursive(dataDir);
    assert.ok(files.some((f) => /secret|jwt|key/i.test(path.basename(f))), `no secret file in the data dir: ${files.join(", ")}`);

    // A token printed by the CLI for the same data directory is accepted.
    const cli = spawnNode(["src/cli/token.ts", "--tenant", "devtenant", "--user", "devuser"], env);
    const { code } = await withTimeout(cli.exit, 30_000, "token CLI");
    assert.is(code, 0, `token CLI failed: ${cli.stderr()}`);
    const token = cli.stdout().trim();
    assert.match(token, /^[\w-]+\.[\w-]+\.[\w-]+$/, "the CLI prints exactly one JWT");
    await expectAccepted(url, token, "dev-mode token from the CLI");
    const { chat } = await parleyClient(url, token).chats.createChat({ name: "dev" });
    assert.is(chat!.creatorId, "devuser");

    // Claims the server would refuse are refused by the CLI (exit 2), not signed.
    for (const args of [["--tenant", "bad.tenant", "--user", "devuser"], ["--tenant", "devtenant", "--user", "bad\u0001user"]]) {
      const refused = spawnNode(["src/cli/token.ts", ...args], env);
      assert.is((await withTimeout(refused.exit, 30_000, "token CLI")).code, 2, args.join(" "));
      assert.is(refused.stdout().trim(), "", "no token printed");
    }

    // Tokens signed with any other secret are still rejected in development mode.
    await expectUnauthenticated(url, `Bearer ${await tokenFor("devtenant", "devuser")}`, "test secret against the dev server");
    await expectUnauthenticated(url, undefined, "no header against the dev server");
  } finally {
    await killChild(server.child);
    await fs.rm(dataDir, { recursive: true, force: true });
  }
});

test("auth - NODE_ENV=production without a key refuses to start with a one-line message", async () => {
  const dataDir = await fs.mkdtemp(path.join(os.tmpdir(), "parley-auth-prod-"));
  const server = spawnNode(["src/main.ts"], childEnv({ NODE_ENV: "production", PARLEY_PORT: "0", PARLEY_HOST: "127.0.0.1", PARLEY_DATA_DIR: dataDir }));
  try {
    const { code } = await withTimeout(server.exit, 30_000, "production start without a key must exit");
    assert.ok(code !== 0 && code !== null, `exit code ${code}`);
    const lines = nonEmptyLines(server.stderr());
    assert.is(lines.length, 1, `expected one line on stderr, got: ${JSON.stringify(server.stderr())}`);
    assert.ok(lines[0]!.includes("PARLEY_JWT_SECRET") && lines[0]!.includes("PARLEY_JWKS_FILE"), `the message names both variables: ${lines[0]}`);
    assert.not.match(server.stdout(), /parley listening/);
    const files = await fs.readdir(dataDir);
    assert.ok(!files.some((f) => /secret/i.test(f)), `production must not generate a secret: ${files}`);
  } finally {
    await killChild(server.child);
    await fs.rm(dataDir, { recursive: true, force: true });
  }
});

test("auth - PARLEY_HOST takes IP addresses (IPv6 also in brackets) and host names, container names included", () => {
  const hostOf = (value: string) => loadConfig({ PARLEY_HOST: value, PARLEY_JWT_SECRET: TEST_SECRET }).host;
  for (const value of ["0.0.0.0", "127.0.0.1", "::", "::1", "localhost", "my-host.internal", "parley_api", "host.example."]) {
    assert.is(hostOf(value), value);
  }
  assert.is(hostOf("[::1]"), "::1");
  for (const value of ["not a host!", "999.1.1.1", "[localhost]", "-bad", "a..b"]) {
    assert.throws(() => hostOf(value), /PARLEY_HOST/, value);
  }
});

/** Settings that must stop the start-up with exit code 2 and one line naming the variable (with a valid key otherwise). */
const refusedSettings: { what: string; variable: string; env?: Record<string, string>; jwks?: () => Promise<object> }[] = [
  { what: "DATABASE_URL=not-a-url", variable: "DATABASE_URL", env: { DATABASE_URL: "not-a-url" } },
  { what: "a PARLEY_HOST that is no host name", variable: "PARLEY_HOST", env: { PARLEY_HOST: "not a host!" } },
  { what: "a PARLEY_HOST that is no IP address", variable: "PARLEY_HOST", env: { PARLEY_HOST: "999.1.1.1" } },
  { what: "a JWKS without keys", variable: "PARLEY_JWKS_FILE", jwks: async () => ({ keys: [] }) },
  { what: "a JWKS with only a symmetric key", variable: "PARLEY_JWKS_FILE", jwks: async () => ({ keys: [{ kty: "oct", k: "c2VjcmV0", kid: "s" }] }) },
  {
    what: "a JWKS whose only key names another algorithm",
    variable: "PARLEY_JWKS_FILE",
    jwks: async () => ({ keys: [{ ...(await exportJWK((await generateKeyPair("ES256")).publicKey)), alg: "ES384", kid: "k" }] }),
  },
  {
    what: "a JWKS holding a private key",
    variable: "PARLEY_JWKS_FILE",
    jwks: async () => ({ keys: [{ ...(await exportJWK((await generateKeyPair("ES256", { extractable: true })).privateKey)), kid: "k" }] }),
  },
  {
    what: "a JWKS with two keys under one kid",
    variable: "PARLEY_JWKS_FILE",
    jwks: async () => {
      const keys = await Promise.all([1, 2].map(async () => ({ ...(await exportJWK((await generateKeyPair("ES256")).publicKey)), kid: "same" })));
      return { keys };
    },
  },
];

for (const { what, variable, env = {}, jwks } of refusedSettings) {
  test(`auth - ${what} refuses to start: exit code 2, one line naming ${variable}`, async () => {
    const dataDir = await fs.mkdtemp(path.join(os.tmpdir(), "parley-auth-refused-"));
    const key: Record<string, string> = { PARLEY_JWT_SECRET: TEST_SECRET };
    if (jwks) {
      key.PARLEY_JWKS_FILE = path.join(dataDir, "jwks.json");
      key.PARLEY_JWT_SECRET = "";
      await fs.writeFile(key.PARLEY_JWKS_FILE, JSON.stringify(await jwks()));
    }
    const server = spawnNode(["src/main.ts"], childEnv({ ...key, PARLEY_PORT: "0", PARLEY_HOST: "127.0.0.1", PARLEY_DATA_DIR: dataDir, ...env }));
    try {
      const { code } = await withTimeout(server.exit, 30_000, `start with ${what} must exit`);
      assert.is(code, 2);
      const lines = nonEmptyLines(server.stderr());
      assert.is(lines.length, 1, `expected one line on stderr, got: ${JSON.stringify(server.stderr())}`);
      assert.ok(lines[0]!.includes(variable), `the message names ${variable}: ${lines[0]}`);
      assert.not.ok(/\n\s+at /.test(server.stderr() + server.stdout()), "no stack trace");
      assert.not.match(server.stdout(), /parley listening/);
    } finally {
      await killChild(server.child);
      await fs.rm(dataDir, { recursive: true, force: true });
    }
  });
}

test.run();
