import { codeToString } from "@connectrpc/connect/protocol-connect";
import { toConnectError } from "../errors.js";
import type { Logger } from "../observability/logger.js";

/**
 * The text of a failed completion or a Close message: the Connect code name and the message the
 * Connect and gRPC APIs would return, e.g. "not_found: chat not found".
 */
export function errorText(error: unknown, log: Logger): string {
  const connectError = toConnectError(error, log);
  return `${codeToString(connectError.code)}: ${connectError.rawMessage}`;
}
