// Where a remote checkpoint's URL points, and how to ask for it. Internal to the core.
//
// http:// and https:// URLs are requested as they are. s3://bucket/key becomes the
// address of that object: at AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, path-style
// (endpoint/bucket/key), or else at bucket.s3.<region>.amazonaws.com; its requests are
// signed with SigV4 when AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are set.
#pragma once

#include <string>
#include <string_view>

namespace tensormap::detail {

struct RemoteTarget {
  std::string url;       // as given: s3://bucket/key or http(s)://...
  std::string shown;     // for messages: the URL without user, password or query values
  std::string http_url;  // what is requested
  bool s3 = false;
  std::string region;  // s3
  std::string access_key;
  std::string secret_key;
  std::string session_token;
  // For messages: where the credentials came from ("the AWS_ACCESS_KEY_ID of the
  // environment", or "no credentials: anonymous").
  std::string credentials;
};

// Resolves `url` with the environment. Throws Error(InvalidArgument) for a URL that is
// not http(s):// or s3://bucket/key.
RemoteTarget resolve_url(const std::string& url);

// The URL of `name` in the folder of `url` (a shard beside its index). `name` is a file
// name, percent-encoded here where the URL is http(s).
std::string sibling_url(const std::string& url, const std::string& name);

// `text` with every byte but the unreserved ones (A-Z a-z 0-9 - . _ ~) percent-encoded,
// and '/' too unless `keep_slash`: what SigV4's canonical request expects.
std::string percent_encoded(std::string_view text, bool keep_slash);

// `url` fit for a message: no user or password, and a query's values replaced by "...",
// since they may be a presigned URL's signature.
std::string shown_url(const std::string& url);

}  // namespace tensormap::detail
