import { test } from "uvu";
import * as assert from "uvu/assert";
import { parleyClient, protocols } from "./support/clients.js";
import { startTestServer, tokenFor, uniqueTenant, type TestServer } from "./support/server.js";

let server: TestServer;
test.before(async () => {
  server = await startTestServer();
});
test.after(async () => {
  await server.destroy();
});

for (const protocol of protocols) {
  test(`transport - ${protocol} round trip: create, send, list`, async () => {
    const tenant = uniqueTenant();
    const alice = parleyClient(server.url, await tokenFor(tenant, "alice"), protocol);
    const { chat } = await alice.chats.createChat({ name: "hi", memberIds: ["bob"] });
    const { message } = await alice.messages.sendMessage({ chatId: chat!.id, text: "hello" });
    assert.is(message!.sequence, 1n);
    const { messages } = await alice.messages.listMessages({ chatId: chat!.id });
    assert.equal(messages.map((m) => m.text), ["hello"]);
  });
}

test.run();
