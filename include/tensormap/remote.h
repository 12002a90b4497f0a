// Checkpoints at URLs: http://, https:// and s3://bucket/key.
//
// Wherever a path is read (Checkpoint::open, StateDict::open, load, the Python package,
// every command that takes an input), a URL may stand: every format works, a sharded
// index's shards are found beside the index's URL, and a torch.save archive is read by
// ranges. Nothing is downloaded whole: the header comes in one or two small range
// requests, and each tensor in ranges of `chunk_bytes`, up to `connections` at a time,
// written straight into the memory it is read into. Map mode has no meaning for a URL:
// LoadMode::Auto copies, and LoadMode::Map is refused with Error(InvalidArgument).
//
// s3:// URLs follow the AWS conventions: credentials from AWS_ACCESS_KEY_ID,
// AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (requests are signed with SigV4; without
// them, requests are anonymous), the region from AWS_REGION or AWS_DEFAULT_REGION
// (us-east-1 otherwise), and an S3-compatible store's address from AWS_ENDPOINT_URL_S3
// or AWS_ENDPOINT_URL, which is addressed path-style (endpoint/bucket/key).
//
// Every response is checked: a range must come back as asked (206, its Content-Range,
// its length), and the object must stay the one first seen (ETag, Last-Modified). Failures
// that may pass (a reset or refused connection, a stall, a short body, 5xx, 429) are
// retried `retries` times with backoff; what is left is an Error of the Remote group
// naming the URL, never a credential.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "tensormap/export.h"

namespace tensormap {

// Whether `path` names a remote checkpoint: it begins with http://, https:// or s3://.
TENSORMAP_EXPORT bool is_url(std::string_view path);

struct TENSORMAP_EXPORT RemoteOptions {
  // Range requests in flight at once, for one opened checkpoint (its shards share them).
  unsigned connections = 8;
  // A tensor's bytes are asked for in ranges of this many bytes.
  uint64_t chunk_bytes = uint64_t{8} << 20;
  // Saves to s3://: the object is uploaded in parts of this many bytes (5 MiB at least,
  // and more where an object would need over 10,000 parts), `connections` at a time.
  uint64_t part_bytes = uint64_t{8} << 20;
  // Tries after the first, for the failures that may pass; the waits double from 0.1 s.
  unsigned retries = 4;
  // The longest a connection may take to open, or a response may go without a byte.
  double timeout_seconds = 30;
  // http(s): sent as "Authorization: Bearer <token>" (a model hub's token).
  std::string bearer_token;
  // https: a PEM file of the certificates a server's certificate must chain to, in place
  // of the system's (/etc/ssl/certs): a private CA's. Empty: the system's.
  std::string ca_bundle;

  // The defaults, with what the environment sets: TENSORMAP_REMOTE_CONNECTIONS,
  // TENSORMAP_REMOTE_CHUNK_BYTES, TENSORMAP_REMOTE_PART_BYTES, TENSORMAP_REMOTE_RETRIES,
  // TENSORMAP_REMOTE_TIMEOUT (seconds), the token from TENSORMAP_BEARER_TOKEN or HF_TOKEN,
  // and the CA bundle from TENSORMAP_REMOTE_CA_BUNDLE or AWS_CA_BUNDLE. Throws
  // Error(InvalidArgument) for a value that is not a number in range.
  static RemoteOptions from_environment();
};

}  // namespace tensormap
