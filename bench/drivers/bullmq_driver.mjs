// BullMQ driver: the same command-line protocol as the Python drivers (bench/README.md).
//
// BullMQ is measured in its best configuration, as the issue asks: Worker concurrency
// BENCH_BULLMQ_CONCURRENCY (default 50), completed jobs removed by the worker (so Redis does
// not grow a "completed" set the Python peers do not keep), addBulk for bulk enqueue, and one
// Node process per worker process.
import { fork } from 'node:child_process';
import { createRequire } from 'node:module';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';

const nodeDir = process.env.BENCH_NODE_DIR ?? join(homedir(), '.cache', 'conveyor-bench', 'node');
// The packages live in the throwaway prefix outside the repository, not next to this file.
const require = createRequire(join(nodeDir, 'package.json'));
const { Queue, Worker } = require('bullmq');
const IORedis = require('ioredis');
const bullmqVersion = require('bullmq/package.json').version;

const REDIS_URL = process.env.BENCH_REDIS_URL ?? 'redis://127.0.0.1:6379/0';
const CONCURRENCY = Number(process.env.BENCH_BULLMQ_CONCURRENCY ?? 50);
const QUEUE = 'bench';
const DONE_KEY = 'bench:done';
const ACK_KEY = 'bench:ack';
const FLUSH_MS = 20;
const PROBE_ACK_TIMEOUT_S = 60;
// Lower numbers run first; jobs with no priority at all would jump every prioritized one.
const PRIORITY = { critical: 1, normal: undefined, low: 100 };

// Must stay identical to RECORD_LUA in driverlib.py: the harness reads one layout.
const RECORD_LUA = `
local n = redis.call('HINCRBY', KEYS[1], 'n', ARGV[1])
local f = redis.call('HGET', KEYS[1], 'first')
if (not f) or tonumber(ARGV[2]) < tonumber(f) then redis.call('HSET', KEYS[1], 'first', ARGV[2]) end
local l = redis.call('HGET', KEYS[1], 'last')
if (not l) or tonumber(ARGV[3]) > tonumber(l) then redis.call('HSET', KEYS[1], 'last', ARGV[3]) end
return n
`;

// Wall-clock seconds with sub-millisecond resolution, comparable with Python's time.time().
const now = () => (performance.timeOrigin + performance.now()) / 1000;

function connection(extra = {}) {
  // Workers need maxRetriesPerRequest: null for their blocking commands.
  return new IORedis(REDIS_URL, { maxRetriesPerRequest: null, ...extra });
}

function jobOptions(lane) {
  const priority = PRIORITY[lane];
  return priority === undefined ? {} : { priority };
}

function parseArgs(argv) {
  const [command, ...rest] = argv;
  const opts = {};
  for (let i = 0; i < rest.length; i += 2) {
    opts[rest[i].replace(/^--/, '').replace(/-/g, '_')] = rest[i + 1];
  }
  return { command, opts };
}

function answer(payload) {
  process.stdout.write('\n' + JSON.stringify(payload) + '\n');
}

function info() {
  return {
    system: 'bullmq',
    version: `bullmq ${bullmqVersion}, node ${process.versions.node}`,
    bulk_api: 'Queue.addBulk',
    priority: true,
    priority_note: 'job priority option (critical 1, low 100)',
    notes: [`Worker concurrency ${CONCURRENCY}, removeOnComplete on the worker`],
  };
}

async function enqueueOne(queue, n, lane) {
  const opts = jobOptions(lane);
  for (let i = 0; i < n; i++) await queue.add('noop', { i }, opts);
}

async function enqueueBulk(queue, n, lane, batch) {
  const opts = jobOptions(lane);
  for (let start = 0; start < n; start += batch) {
    const jobs = [];
    for (let i = start; i < Math.min(n, start + batch); i++) jobs.push({ name: 'noop', data: { i }, opts });
    await queue.addBulk(jobs);
  }
}

async function probe(queue, samples, warmup, gapMs, lane) {
  const client = connection();
  await client.del(ACK_KEY);
  const latencies = [];
  const opts = jobOptions(lane);
  try {
    for (let seq = 0; seq < warmup + samples; seq++) {
      const sent = now();
      await queue.add('probe', { seq }, opts);
      let started;
      for (;;) {
        const got = await client.blpop(ACK_KEY, PROBE_ACK_TIMEOUT_S);
        if (got === null) throw new Error(`probe ${seq} not picked up within ${PROBE_ACK_TIMEOUT_S} s`);
        const [ackSeq, t] = got[1].split(' ');
        if (Number(ackSeq) === seq) {
          started = Number(t);
          break;
        }
      }
      if (seq >= warmup) latencies.push((started - sent) * 1000);
      const pause = (0.5 + Math.random()) * gapMs;
      await new Promise((resolve) => setTimeout(resolve, pause));
    }
  } finally {
    client.disconnect();
  }
  return { latencies_ms: latencies };
}

function runOneWorker() {
  const recorder = connection();
  recorder.defineCommand('benchRecord', { numberOfKeys: 1, lua: RECORD_LUA });
  let n = 0;
  let flushed = 0;
  let first = 0;
  let last = 0;
  // Counting in memory and publishing every FLUSH_MS keeps the handler almost free, as in
  // the Python recorder; a per-job round trip would flatten the ratios between systems.
  const timer = setInterval(async () => {
    const delta = n - flushed;
    if (delta > 0) {
      flushed += delta;
      try {
        await recorder.benchRecord(DONE_KEY, delta, String(first), String(last));
      } catch {
        flushed -= delta;
      }
    }
  }, FLUSH_MS);

  const worker = new Worker(
    QUEUE,
    async (job) => {
      const t = now();
      if (job.name === 'probe') {
        await recorder.lpush(ACK_KEY, `${job.data.seq} ${t}`);
        return;
      }
      if (n === 0) first = t;
      n += 1;
      last = t;
    },
    { connection: connection(), concurrency: CONCURRENCY, removeOnComplete: { count: 0 } },
  );
  worker.on('error', (err) => console.error('worker error', err));

  const stop = async () => {
    clearInterval(timer);
    await worker.close();
    recorder.disconnect();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

function fanOut(procs) {
  const self = fileURLToPath(import.meta.url);
  const children = [];
  for (let i = 0; i < procs; i++) children.push(fork(self, ['worker', '--procs', '1']));
  const forward = (sig) => children.forEach((c) => c.exitCode === null && c.kill(sig));
  process.on('SIGTERM', () => forward('SIGTERM'));
  process.on('SIGINT', () => forward('SIGINT'));
  let alive = procs;
  children.forEach((c) => c.on('exit', () => (--alive === 0 ? process.exit(0) : undefined)));
}

async function main() {
  const { command, opts } = parseArgs(process.argv.slice(2));
  if (command === 'worker') {
    const procs = Number(opts.procs ?? 1);
    if (procs > 1) fanOut(procs);
    else runOneWorker();
    return;
  }
  const client = connection();
  const queue = new Queue(QUEUE, { connection: client });
  try {
    await queue.waitUntilReady();
    let result;
    const lane = opts.lane ?? 'normal';
    const n = Number(opts.n);
    const started = performance.now();
    if (command === 'info') result = info();
    else if (command === 'enqueue_one') await enqueueOne(queue, n, lane);
    else if (command === 'enqueue_bulk') await enqueueBulk(queue, n, lane, Number(opts.batch ?? 1000));
    else if (command === 'probe') {
      result = await probe(
        queue,
        Number(opts.samples),
        Number(opts.warmup ?? 3),
        Number(opts.gap_ms ?? 20),
        lane,
      );
    } else throw new Error(`unknown command ${command}`);
    if (command.startsWith('enqueue')) result = { n, seconds: (performance.now() - started) / 1000 };
    answer({ ok: true, ...result });
  } catch (err) {
    console.error(err);
    answer({ ok: false, error: String(err?.message ?? err) });
    process.exitCode = 1;
  } finally {
    await queue.close();
    // A connection handed to a Queue stays open after close() and would keep Node alive.
    client.disconnect();
  }
}

main();
