/**
 * What to do when a connection ends, with no I/O: how a connection's end
 * is classified (GOAWAY reasons, WebSocket close codes), the backoff with
 * full jitter, and the gateways to try in order. The same rules as the
 * Rust SDK's driver (`client/src/lib.rs`).
 */

import { GoAwayReason, goAwayReasonName } from "./codec.js";

/** Why a client stopped for good. */
export type CloseReason =
  /** The business server kicked the user (GOAWAY kicked). */
  | "kicked"
  /** The connection's only app was deleted (GOAWAY app_deleted). */
  | "appDeleted"
  /** Every app's BIND failed, or the server said GOAWAY auth_failed: retrying the same tokens cannot help. */
  | "authFailed"
  /** The application called `close()`. */
  | "closedByClient"
  /** The client cannot run here (no WebSocket implementation). */
  | "error";

export interface ClosedEvent {
  type: "closed";
  reason: CloseReason;
  /** For people and logs. */
  message: string;
  /** authFailed: the app whose BIND failed last, its BIND_ERR code and text. */
  app?: string;
  code?: number;
  codeName?: string;
  bindMessage?: string;
}

/** The GOAWAY that ended a connection. */
export interface GoAwayInfo {
  reason: number;
  reasonName: string;
  reconnectDelayMs: number | undefined;
}

/** How one connection ended. */
export type Ended =
  | { kind: "terminal"; closed: ClosedEvent }
  | {
      kind: "lost";
      error: string;
      /** Whether HELLO_OK arrived on this connection. */
      handshakeDone: boolean;
      /** The server's reconnect hint (GOAWAY reconnect_delay_ms). */
      hintMs?: number | undefined;
      /** The connection ended on a protocol error (either side's): it does not reset the backoff. */
      protocolError?: boolean;
      goAway?: GoAwayInfo | undefined;
      /** The WebSocket close code, when the socket closed before anything else ended the connection. */
      closeCode?: number | undefined;
    };

export type Lost = Extract<Ended, { kind: "lost" }>;

export function lost(error: string, handshakeDone: boolean, extra: Partial<Omit<Lost, "kind" | "error" | "handshakeDone">> = {}): Lost {
  return { kind: "lost", error, handshakeDone, ...extra };
}

/** A BIND_ERR, kept to explain an authFailed stop. */
export interface BindFailure {
  app: string;
  code: number;
  codeName: string;
  message: string;
}

export function authFailed(failure: BindFailure | undefined, why: string): Ended {
  const closed: ClosedEvent = { type: "closed", reason: "authFailed", message: why };
  if (failure !== undefined) {
    closed.app = failure.app;
    closed.code = failure.code;
    closed.codeName = failure.codeName;
    closed.bindMessage = failure.message;
  }
  return { kind: "terminal", closed };
}

/**
 * A GOAWAY's verdict, as docs/protocol.md's table says the client should
 * act: kicked stops for good; auth_failed stops for good too (this SDK
 * cannot get new tokens by itself); every other reason, known or not,
 * reconnects: after `reconnect_delay_ms` plus jitter when the frame names
 * one (server_shutdown, overloaded), else with backoff. A protocol_error
 * GOAWAY does not reset the backoff.
 */
export function endedByGoAway(goAway: GoAwayInfo, handshakeDone: boolean, lastBindFailure?: BindFailure): Ended {
  if (goAway.reason === GoAwayReason.Kicked) {
    return {
      kind: "terminal",
      closed: { type: "closed", reason: "kicked", message: "kicked by the server (GOAWAY kicked)" },
    };
  }
  if (goAway.reason === GoAwayReason.AppDeleted) {
    return {
      kind: "terminal",
      closed: { type: "closed", reason: "appDeleted", message: "the app was deleted (GOAWAY app_deleted)" },
    };
  }
  if (goAway.reason === GoAwayReason.AuthFailed) {
    return authFailed(lastBindFailure, "too many failed BINDs (GOAWAY auth_failed): new tokens are needed");
  }
  return lost(`server sent GOAWAY (${goAway.reasonName})`, handshakeDone, {
    hintMs: goAway.reconnectDelayMs,
    goAway,
    protocolError: goAway.reason === GoAwayReason.ProtocolError,
  });
}

/** WebSocket close code 1001: the server is going away (GOAWAY server_shutdown or overloaded). */
export const CLOSE_GOING_AWAY = 1001;

/**
 * A WebSocket close that nothing before it explained (no GOAWAY, ERROR or
 * timeout ended the connection first). 1001 is taken as GOAWAY
 * server_shutdown without a delay: reconnect with backoff.
 */
export function endedByClose(code: number, reason: string, handshakeDone: boolean): Lost {
  const suffix = reason ? `: ${reason}` : "";
  if (code === CLOSE_GOING_AWAY) {
    return lost(`server going away (WebSocket close 1001${suffix})`, handshakeDone, {
      closeCode: code,
      goAway: {
        reason: GoAwayReason.ServerShutdown,
        reasonName: goAwayReasonName(GoAwayReason.ServerShutdown),
        reconnectDelayMs: undefined,
      },
    });
  }
  const what = handshakeDone ? "connection closed by the server" : "connection failed or closed before HELLO_OK";
  return lost(`${what} (WebSocket close ${code}${suffix})`, handshakeDone, {
    closeCode: code,
    protocolError: code === 1002 || code === 1003 || code === 1007 || code === 1009,
  });
}

export interface BackoffOptions {
  /** The first bound, in ms (default 200). */
  initialMs: number;
  /** The largest bound, in ms (default 30,000). */
  maxMs: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = { initialMs: 200, maxMs: 30_000 };

/**
 * Reconnect delays: each wait is drawn at random in [0, bound] (full
 * jitter); the bound starts at `initialMs`, doubles after each wait up to
 * `maxMs`, and goes back to `initialMs` after a connection that completed
 * its handshake. A server's hint is waited out instead, plus up to half of
 * it again at random (the bound still doubles).
 */
export class Backoff {
  private current: number;

  constructor(private readonly options: BackoffOptions = DEFAULT_BACKOFF) {
    if (!(options.initialMs >= 0) || !(options.maxMs >= options.initialMs)) {
      throw new RangeError("backoff needs 0 <= initialMs <= maxMs");
    }
    this.current = options.initialMs;
  }

  /** The bound of the next wait. */
  get bound(): number {
    return this.current;
  }

  /** The next wait, in ms. `random` gives numbers in [0, 1). */
  next(random: () => number, hintMs?: number): number {
    const wait = hintMs === undefined ? random() * this.current : hintMs + random() * (hintMs / 2);
    this.current = Math.min(this.current * 2, this.options.maxMs);
    return wait;
  }

  reset(): void {
    this.current = this.options.initialMs;
  }
}

/**
 * The gateways to try, in order, and the last that worked per network.
 * When the list is used up it is made again: the last gateway that worked
 * on this network first, then the dispatcher's answer (or the configured
 * gateways without one, or when it cannot be asked and nothing worked yet).
 */
export class Gateways {
  private queue: string[] = [];
  private readonly lastGood = new Map<string, string>();

  constructor(private readonly configured: readonly string[]) {}

  hasNext(): boolean {
    return this.queue.length > 0;
  }

  /**
   * The next gateway to try (undefined: none known), and why the
   * dispatcher could not be asked, if it could not.
   */
  async next(
    network: string,
    dispatcher: (() => Promise<string[]>) | undefined,
  ): Promise<{ gateway: string | undefined; dispatchError: string | undefined }> {
    let dispatchError: string | undefined;
    if (this.queue.length === 0) {
      const list: string[] = [];
      const good = this.lastGood.get(network);
      if (good !== undefined) list.push(good);
      if (dispatcher !== undefined) {
        try {
          list.push(...(await dispatcher()));
        } catch (error) {
          dispatchError = error instanceof Error ? error.message : String(error);
          if (list.length === 0) list.push(...this.configured);
        }
      } else {
        list.push(...this.configured);
      }
      for (const gateway of list) {
        if (!this.queue.includes(gateway)) this.queue.push(gateway);
      }
    }
    return { gateway: this.queue.shift(), dispatchError };
  }

  /** `gateway` completed a handshake: try it first next time, after which the list is made anew. */
  worked(network: string, gateway: string): void {
    this.lastGood.set(network, gateway);
    this.queue = [];
  }
}

/** What the driver does after a connection ended. */
export type Decision =
  | { action: "stop"; closed: ClosedEvent }
  /** Try the next gateway of the list at once: this one could not be reached. */
  | { action: "failover" }
  | { action: "wait"; delayMs: number };

/**
 * Decides after a connection to `gateway` ended: stop for good, fail over
 * to the next gateway at once (not reached, and more to try), or wait.
 * Updates the backoff and the gateways' memory as the Rust SDK does.
 */
export function decide(
  ended: Ended,
  gateway: string | undefined,
  network: string,
  backoff: Backoff,
  gateways: Gateways,
  random: () => number,
): Decision {
  if (ended.kind === "terminal") return { action: "stop", closed: ended.closed };
  if (ended.handshakeDone) {
    if (gateway !== undefined) gateways.worked(network, gateway);
    if (!ended.protocolError) backoff.reset();
  } else if (gateways.hasNext()) {
    return { action: "failover" };
  }
  return { action: "wait", delayMs: backoff.next(random, ended.hintMs) };
}
