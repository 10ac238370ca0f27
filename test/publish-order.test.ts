// PublishOrder on its own: replies of concurrent sends to one chat arrive in any order, events must
// not. (The streams suite checks the same end to end, where the reordering depends on timing.)
import { test } from "uvu";
import * as assert from "uvu/assert";
import { PublishOrder } from "../src/services/publish-order.js";

const tick = () => new Promise((resolve) => setImmediate(resolve));

test("publish order - replies that come back 3, 1, 2 are published 1, 2, 3", async () => {
  const order = new PublishOrder();
  const published: bigint[] = [];
  const publish = (sequence: bigint) => async () => void published.push(sequence);
  const [a, b, c] = [order.enter("chat"), order.enter("chat"), order.enter("chat")];
  const done = [c.publish(3n, publish(3n))];
  await tick();
  assert.equal(published, [], "3 waits for the sends still running");
  done.push(a.publish(1n, publish(1n)));
  await tick();
  assert.equal(published, [], "1 waits too: the send still running might hold a lower sequence");
  done.push(b.publish(2n, publish(2n)));
  await Promise.all(done);
  assert.equal(published, [1n, 2n, 3n]);
});

test("publish order - a failed or duplicate send releases the events waiting for it", async () => {
  const order = new PublishOrder();
  const published: bigint[] = [];
  const [failing, ok] = [order.enter("chat"), order.enter("chat")];
  const waiting = ok.publish(1n, async () => void published.push(1n));
  await tick();
  assert.equal(published, []);
  failing.skip();
  await waiting;
  assert.equal(published, [1n]);
});

test("publish order - a send that starts after another finished does not hold it back; chats are independent", async () => {
  const order = new PublishOrder();
  const published: string[] = [];
  const first = order.enter("chat");
  const other = order.enter("other chat");
  await first.publish(1n, async () => void published.push("chat 1"));
  const later = order.enter("chat");
  await later.publish(2n, async () => void published.push("chat 2"));
  assert.equal(published, ["chat 1", "chat 2"], "the other chat's running send holds nothing back");
  other.skip();
});

test.run();
