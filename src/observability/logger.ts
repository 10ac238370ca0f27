import { pino } from "pino";

export type Logger = pino.Logger;

/** JSON logs on stdout. Tokens and message texts are never logged; authorization headers are redacted. */
export function createLogger(level: string): Logger {
  return pino({
    level,
    base: { service: "parley" },
    redact: ["req.headers.authorization", "authorization", "token", "text"],
  });
}
