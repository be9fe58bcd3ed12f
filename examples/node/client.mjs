// modelfleet from Node.js with nothing but the .proto files in protos/:
// submit a training job, watch it to the end, then call ModelInfer (Open
// Inference Protocol) on the model version it registered.
//
//   npm ci --prefix examples/node
//   node examples/node/client.mjs --dataset digits --model node-digits-mlp --epochs 3
//
// Endpoints, token and TLS come from the same MODELFLEET_* variables as the
// Python CLI (see docs/clients.md). Exit code: 0 when the job succeeded and the
// model answered, 1 otherwise.

import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const PROTOS = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "protos");
const env = process.env;
const { values: opts } = parseArgs({
  options: {
    dataset: { type: "string", default: "digits" },
    "dataset-version": { type: "string", default: "" },
    model: { type: "string", default: "node-digits-mlp" },
    epochs: { type: "string", default: "3" },
    host: { type: "string", default: "127.0.0.1" },
    "serve-timeout": { type: "string", default: "60" },
  },
});

// Load the contracts at run time: field names as in the .proto (keepCase),
// enums as their names, int64 as strings (a JS number loses precision past 2^53).
const definition = protoLoader.loadSync(
  [
    "modelfleet/training/v1/training.proto",
    "modelfleet/jobs/v1/jobs.proto",
    "inference/grpc_predict_v2.proto",
  ],
  { includeDirs: [PROTOS], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
);
const api = grpc.loadPackageDefinition(definition);

// Channel settings that matter (docs/clients.md): our servers accept messages
// up to MODELFLEET_MAX_MESSAGE_BYTES (256 MiB) while gRPC clients default to
// 4 MiB received; keepalive pings keep the long WatchJob stream open through
// proxies and load balancers that drop idle connections.
const maxMessage = Number(env.MODELFLEET_MAX_MESSAGE_BYTES ?? 256 * 1024 * 1024);
const channelOptions = {
  "grpc.max_receive_message_length": maxMessage,
  "grpc.max_send_message_length": maxMessage,
  "grpc.keepalive_time_ms": 30_000,
  "grpc.keepalive_timeout_ms": 10_000,
};

function credentials() {
  const read = (path) => (path ? readFileSync(path) : null);
  if (!env.MODELFLEET_TLS_CA_FILE && !env.MODELFLEET_TLS_CLIENT_CERT_FILE) {
    return grpc.credentials.createInsecure();
  }
  if (env.MODELFLEET_TLS_SERVER_NAME) {
    channelOptions["grpc.ssl_target_name_override"] = env.MODELFLEET_TLS_SERVER_NAME;
  }
  return grpc.credentials.createSsl(
    read(env.MODELFLEET_TLS_CA_FILE),
    read(env.MODELFLEET_TLS_CLIENT_KEY_FILE),
    read(env.MODELFLEET_TLS_CLIENT_CERT_FILE),
  );
}

function metadata() {
  const md = new grpc.Metadata();
  if (env.MODELFLEET_TOKEN) md.set("authorization", `Bearer ${env.MODELFLEET_TOKEN}`);
  return md;
}

const deadline = (seconds) => ({ deadline: new Date(Date.now() + seconds * 1000) });
const host = opts.host;
const creds = credentials();
const training = new api.modelfleet.training.v1.TrainingService(
  `${host}:${env.MODELFLEET_TRAINING_PORT ?? 50052}`, creds, channelOptions);
// JobService is served by the training service too: same address.
const jobs = new api.modelfleet.jobs.v1.JobService(
  `${host}:${env.MODELFLEET_TRAINING_PORT ?? 50052}`, creds, channelOptions);
const inference = new api.inference.GRPCInferenceService(
  `${host}:${env.MODELFLEET_INFERENCE_PORT ?? 8001}`, creds, channelOptions);

const call = (client, method, request, seconds = 30) =>
  new Promise((resolve, reject) =>
    client[method](request, metadata(), deadline(seconds), (err, reply) => (err ? reject(err) : resolve(reply))));

function submit() {
  return call(training, "SubmitTrainingJob", {
    spec: {
      dataset_name: opts.dataset,
      dataset_version: opts["dataset-version"],
      model_name: opts.model,
      architecture: { mlp: { hidden_sizes: [64] } },
      task: "TASK_CLASSIFICATION",
      epochs: Number(opts.epochs),
      world_size: 1,
      seed: "0",
    },
  });
}

// Follow the job until a terminal state; resolves with the last job record.
function watch(jobId) {
  return new Promise((resolve, reject) => {
    let last = null;
    // No deadline: a job runs as long as it runs; keepalive detects a dead peer.
    const stream = jobs.WatchJob({ job_id: jobId }, metadata());
    stream.on("data", ({ event, job }) => {
      last = job;
      const metrics = Object.entries(event.metrics).map(([k, v]) => `${k}=${v.toPrecision(4)}`);
      console.log(`${(event.progress * 100).toFixed(0).padStart(3)}% ${event.state} ${metrics.join(" ")} ${event.message}`);
      if (["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"].includes(event.state)) {
        stream.cancel();
        resolve(job);
      }
    });
    stream.on("error", (err) => (err.code === grpc.status.CANCELLED && last ? resolve(last) : reject(err)));
    stream.on("end", () => resolve(last));
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Replicas pick up a new version from the registry within seconds; until then
// the version is NOT_FOUND (or the model UNAVAILABLE while it loads).
async function whenServed(name, version) {
  const until = Date.now() + Number(opts["serve-timeout"]) * 1000;
  for (;;) {
    try {
      return await call(inference, "ModelMetadata", { name, version }, 10);
    } catch (err) {
      const retry = [grpc.status.NOT_FOUND, grpc.status.UNAVAILABLE].includes(err.code);
      if (!retry || Date.now() > until) throw err;
      await sleep(250);
    }
  }
}

async function infer(name, version, meta) {
  const input = meta.inputs[0];
  const width = Number(input.shape[input.shape.length - 1]);
  const rows = 2;
  // Raw FP32 little-endian bytes: the compact OIP encoding, no per-element protobuf overhead.
  const data = Buffer.alloc(rows * width * 4);
  for (let i = 0; i < rows * width; i++) data.writeFloatLE((i % 17) / 16, i * 4);
  const reply = await call(inference, "ModelInfer", {
    model_name: name,
    model_version: version,
    inputs: [{ name: input.name, datatype: "FP32", shape: [rows, width] }],
    raw_input_contents: [data],
  });
  const out = reply.raw_output_contents[0];
  const classes = out.length / 4 / rows;
  const argmax = [];
  for (let r = 0; r < rows; r++) {
    let best = 0;
    for (let c = 1; c < classes; c++) {
      if (out.readFloatLE((r * classes + c) * 4) > out.readFloatLE((r * classes + best) * 4)) best = c;
    }
    argmax.push(best);
  }
  return { version: reply.model_version, shape: reply.outputs[0].shape, argmax };
}

async function main() {
  const { job } = await submit();
  console.log(`submitted training job ${job.id} (${job.state})`);
  const final = await watch(job.id);
  if (final?.state !== "JOB_STATE_SUCCEEDED") {
    console.error(`job ${job.id} ended ${final?.state ?? "without a state"}: ${final?.last_error ?? ""}`);
    return 1;
  }
  const { model_name: name, model_version: version } = final.result;
  console.log(`registered ${name} v${version}`);
  const meta = await whenServed(name, version);
  const result = await infer(name, version, meta);
  console.log(`ModelInfer ${name} v${result.version}: output shape [${result.shape}], predicted classes ${result.argmax}`);
  return result.version === version ? 0 : 1;
}

main()
  .then((code) => process.exit(code))
  .catch((err) => {
    console.error(`modelfleet node client: ${err.code !== undefined ? grpc.status[err.code] + ": " : ""}${err.details ?? err.message}`);
    process.exit(1);
  });
