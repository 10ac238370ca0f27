import { toJson, type JsonObject } from "@bufbuild/protobuf";
import { NotificationSchema, type Notification } from "../../gen/parley/v1/notification_pb.js";
import { invocationMessage } from "./protocol.js";

type EventCase = NonNullable<Notification["event"]["case"]>;

/** Hub method the client handles for each event; heartbeats are not forwarded (hub pings keep the connection alive). */
const targets: Record<EventCase, string | undefined> = {
  ready: "Ready",
  messageCreated: "MessageCreated",
  chatCreated: "ChatCreated",
  memberAdded: "MemberAdded",
  memberRemoved: "MemberRemoved",
  readUpdated: "ReadUpdated",
  heartbeat: undefined,
};

/**
 * Proto3 JSON with fields at their default values included (`"unreadCount": "0"`, `"clientMessageId": ""`),
 * so SignalR clients, which have no generated types, see every field.
 */
export const hubJsonOptions = { alwaysEmitImplicit: true } as const;

/** Invocation records by event: one event reaches many connections, and is encoded once for all. */
const invocations = new WeakMap<Notification, string>();

/** The invocation record that delivers a notification, or undefined for events that are not forwarded. */
export function eventInvocation(notification: Notification): string | undefined {
  const eventCase = notification.event.case;
  const target = eventCase && targets[eventCase];
  if (!eventCase || !target) return undefined;
  let invocation = invocations.get(notification);
  if (invocation === undefined) {
    const json = toJson(NotificationSchema, notification, hubJsonOptions) as JsonObject;
    // The oneof member's JSON name is its lowerCamelCase field name, the same as the case.
    invocation = invocationMessage(target, [json[eventCase] ?? {}]);
    invocations.set(notification, invocation);
  }
  return invocation;
}
