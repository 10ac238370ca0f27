/**
 * The SignalR JSON hub protocol, version 1: records are JSON texts each ending with U+001E.
 * https://github.com/dotnet/aspnetcore/blob/main/src/SignalR/docs/specs/HubProtocol.md
 */
export const RECORD_SEPARATOR = "\x1e";

export const MessageType = {
  Invocation: 1,
  StreamItem: 2,
  Completion: 3,
  StreamInvocation: 4,
  CancelInvocation: 5,
  Ping: 6,
  Close: 7,
  Ack: 8,
  Sequence: 9,
} as const;

/** Splits buffered text into complete records and the incomplete rest. */
export function splitRecords(text: string): { records: string[]; rest: string } {
  const parts = text.split(RECORD_SEPARATOR);
  const rest = parts.pop() ?? "";
  return { records: parts, rest };
}

export function record(value: unknown): string {
  return JSON.stringify(value) + RECORD_SEPARATOR;
}

export const PING = record({ type: MessageType.Ping });

/** The handshake reply: `{}` on success, `{"error": …}` otherwise. */
export function handshakeResponse(error?: string): string {
  return record(error === undefined ? {} : { error });
}

export function closeMessage(error?: string, allowReconnect = false): string {
  return record({
    type: MessageType.Close,
    ...(error === undefined ? {} : { error }),
    ...(allowReconnect ? { allowReconnect } : {}),
  });
}

export function invocationMessage(target: string, args: unknown[]): string {
  return record({ type: MessageType.Invocation, target, arguments: args });
}

export function completionMessage(invocationId: string, outcome: { result: unknown } | { error: string }): string {
  return record({ type: MessageType.Completion, invocationId, ...outcome });
}

/** Checks a handshake request; returns the error to send back, or undefined when it is acceptable. */
export function checkHandshake(text: string): string | undefined {
  let request: unknown;
  try {
    request = JSON.parse(text);
  } catch {
    return "Handshake request is not valid JSON; expected {\"protocol\":\"json\",\"version\":1}.";
  }
  if (!isObject(request) || typeof request.protocol !== "string" || typeof request.version !== "number") {
    return "Handshake was expected first: {\"protocol\":\"json\",\"version\":1}.";
  }
  if (request.protocol !== "json") return `The protocol '${request.protocol}' is not supported.`;
  if (request.version !== 1) return `The server does not support version ${request.version} of the 'json' protocol.`;
  return undefined;
}

export function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** An invocation (type 1 or 4) after its shape was checked. */
export interface Invocation {
  invocationId: string | undefined;
  target: string;
  arguments: unknown[];
  streamIds: unknown[] | undefined;
}

/** The invocation in a parsed message, or undefined when its fields have the wrong types. */
export function readInvocation(message: Record<string, unknown>): Invocation | undefined {
  const { target, arguments: args, streamIds } = message;
  const invocationId = message.invocationId ?? undefined;
  if (invocationId !== undefined && typeof invocationId !== "string") return undefined;
  if (typeof target !== "string" || !Array.isArray(args)) return undefined;
  if (streamIds !== undefined && streamIds !== null && !Array.isArray(streamIds)) return undefined;
  return { invocationId, target, arguments: args, streamIds: streamIds ?? undefined };
}
