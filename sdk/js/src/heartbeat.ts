/**
 * Heartbeat probing: the client looks for the longest interval its
 * network's NAT lets an idle connection live, and remembers it (the same
 * rules as the Rust SDK's `HeartbeatProbe`).
 *
 * After `healthyBeforeProbe` answered PINGs at an interval, the interval
 * held: it is remembered, and the client proposes one `stepMs` longer
 * (HEARTBEAT; the server answers the interval in force, clamped to its
 * range). When a connection goes silent (no PONG to a PING: the NAT
 * dropped the idle flow), or closes while a PING is out (a NAT that
 * resets forgotten flows), the interval in force failed: the client falls
 * back to the last one that held and does not probe above it for `holdMs`.
 * The server may also say, on the next connection, that it closed the
 * previous one at its heartbeat deadline (SESSION_TIMED_OUT): a loss the
 * client could not explain then counts the same way, for the interval the
 * server names.
 * What was learned is kept per network type, and per carrier or Wi-Fi
 * network id when the application supplies one.
 */

import type { StorageLike } from "./storage.js";

/** The shortest interval a failure falls back to. */
const INTERVAL_MIN_MS = 1_000;

export interface HeartbeatProbeOptions {
  /** How much longer each probe tries (milliseconds). */
  stepMs: number;
  /** PINGs answered at an interval before it counts as held and the next probe starts (at least 1). */
  healthyBeforeProbe: number;
  /** After a failed interval, no probe above the one that held for this long (milliseconds). */
  holdMs: number;
  /** The carrier or Wi-Fi network the device is on, if the application knows it. */
  networkId?: string;
  /**
   * Where learned intervals are kept across page loads, as JSON under
   * `storageKey` (default: the global `localStorage` when there is one,
   * else memory only). Errors are ignored: the client goes on in memory.
   */
  storage?: StorageLike;
  /** The key in `storage` (default `herald.heartbeat`). */
  storageKey?: string;
}

interface Learned {
  /** The longest interval that held. */
  heldMs: number;
  /** No probe above `heldMs` before this wall-clock time (ms since the epoch). */
  holdUntilMs: number;
}

/** One connection, as far as explaining its loss goes. */
interface ConnectionRecord {
  /** When its handshake finished (wall clock, ms since the epoch). */
  startedMs: number;
  /** Its loss is explained (counted as a failure, or the server said why with GOAWAY). */
  explained: boolean;
}

/** The probing state of one client: what it learned, and where the current connection stands. */
export class HeartbeatLearner {
  private readonly key: string;
  private readonly storage: StorageLike | undefined;
  private readonly storageKey: string;
  private learnedByKey: Record<string, Learned>;
  private inForceMs = 0;
  private proposedMs: number | undefined;
  private answered = 0;
  private serverMaxMs: number | undefined;
  private current: ConnectionRecord | undefined;
  /** The connection before the current one: what a SESSION_TIMED_OUT on the current one is about. */
  private previous: ConnectionRecord | undefined;

  constructor(
    private readonly probe: HeartbeatProbeOptions,
    network: string,
    private readonly wallClock: () => number = Date.now,
  ) {
    this.key = probe.networkId === undefined ? network : `${network}/${probe.networkId}`;
    this.storage = probe.storage ?? defaultStorage();
    this.storageKey = probe.storageKey ?? "herald.heartbeat";
    this.learnedByKey = this.load();
  }

  /** The handshake is done at the server's start interval. Returns the interval to propose, if one was learned. */
  connected(serverIntervalMs: number): number | undefined {
    this.inForceMs = serverIntervalMs;
    this.answered = 0;
    this.serverMaxMs = undefined;
    this.proposedMs = undefined;
    this.previous = this.current;
    this.current = { startedMs: this.wallClock(), explained: false };
    const held = this.learnedByKey[this.key]?.heldMs;
    if (held === undefined || held === serverIntervalMs) return undefined;
    this.proposedMs = held;
    return held;
  }

  /** The server answered a proposal with the interval in force. */
  set(intervalMs: number): void {
    if (this.proposedMs !== undefined && intervalMs < this.proposedMs) this.serverMaxMs = intervalMs;
    this.proposedMs = undefined;
    this.inForceMs = intervalMs;
    this.answered = 0;
  }

  /** A PING was answered. Returns a longer interval to propose, when the current one held long enough. */
  pingAnswered(): number | undefined {
    this.answered += 1;
    if (this.answered < Math.max(1, this.probe.healthyBeforeProbe) || this.proposedMs !== undefined) return undefined;
    this.answered = 0;
    const entry = this.learnedByKey[this.key] ?? { heldMs: 0, holdUntilMs: 0 };
    if (entry.heldMs !== this.inForceMs) {
      entry.heldMs = this.inForceMs;
      this.learnedByKey[this.key] = entry;
      this.save();
    }
    const next = this.inForceMs + this.probe.stepMs;
    if (this.serverMaxMs !== undefined && next > this.serverMaxMs) return undefined;
    if (this.wallClock() < entry.holdUntilMs && next > entry.heldMs) return undefined;
    this.proposedMs = next;
    return next;
  }

  /** The connection went silent at the interval in force: fall back and hold. */
  failed(): void {
    this.explained();
    this.failAt(this.inForceMs);
    this.proposedMs = undefined;
  }

  /** The server said why the current connection ends (GOAWAY). */
  explained(): void {
    if (this.current !== undefined) this.current.explained = true;
  }

  /**
   * The server closed the previous connection at its heartbeat deadline
   * `closedAgoMs` ago, while it pinged at `intervalMs` (on this client's
   * network type: the caller checks). If that connection's loss was not
   * explained already and the report is about it (not about one from
   * before it), the interval failed. Returns the interval to propose now,
   * when the current connection's is above what is left to hold.
   */
  previousTimedOut(intervalMs: number, closedAgoMs: number): number | undefined {
    const previous = this.previous;
    if (previous === undefined || previous.explained) return undefined;
    if (this.wallClock() - closedAgoMs < previous.startedMs) return undefined;
    previous.explained = true;
    const held = this.failAt(intervalMs);
    const pingingAt = this.proposedMs ?? this.inForceMs;
    if (pingingAt <= held) return undefined;
    this.proposedMs = held;
    return held;
  }

  /**
   * Counts `failedMs` as an interval the NAT did not keep: falls back to the
   * last one that held below it (one step down if none did) and holds
   * probing there. Returns that interval.
   */
  private failAt(failedMs: number): number {
    const held = this.learnedByKey[this.key]?.heldMs;
    const fallback = held !== undefined && held < failedMs ? held : failedMs - this.probe.stepMs;
    const heldMs = Math.max(fallback, INTERVAL_MIN_MS);
    this.learnedByKey[this.key] = { heldMs, holdUntilMs: this.wallClock() + this.probe.holdMs };
    this.save();
    return heldMs;
  }

  /** A proposal is out and unanswered. */
  get awaitingAnswer(): boolean {
    return this.proposedMs !== undefined;
  }

  /** The interval learned for the current network, if any. */
  get learnedMs(): number | undefined {
    return this.learnedByKey[this.key]?.heldMs;
  }

  private load(): Record<string, Learned> {
    try {
      const text = this.storage?.getItem(this.storageKey);
      if (text === null || text === undefined) return {};
      const parsed: unknown = JSON.parse(text);
      return typeof parsed === "object" && parsed !== null ? (parsed as Record<string, Learned>) : {};
    } catch {
      return {};
    }
  }

  private save(): void {
    try {
      this.storage?.setItem(this.storageKey, JSON.stringify(this.learnedByKey));
    } catch {
      // Memory only, then.
    }
  }
}

function defaultStorage(): StorageLike | undefined {
  const global = globalThis as { localStorage?: StorageLike };
  try {
    return global.localStorage;
  } catch {
    // Some browsers throw on access when storage is disabled.
    return undefined;
  }
}
