// Remote URLs and the S3 addressing of url.h.
#include "remote/url.h"

#include <cstdlib>
#include <string_view>

#include "tensormap/error.h"
#include "tensormap/remote.h"

namespace tensormap {

bool is_url(std::string_view path) {
  return path.rfind("http://", 0) == 0 || path.rfind("https://", 0) == 0 || path.rfind("s3://", 0) == 0;
}

namespace detail {
namespace {

std::string environment(const char* name) {
  const char* value = std::getenv(name);
  return value ? std::string(value) : std::string();
}

bool unreserved(unsigned char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
         c == '_' || c == '~';
}

}  // namespace

std::string percent_encoded(std::string_view text, bool keep_slash) {
  static const char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (const char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (unreserved(c) || (keep_slash && c == '/')) {
      out += ch;
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

namespace {

[[noreturn]] void refuse(const std::string& url, const std::string& why) {
  throw Error(ErrorKind::InvalidArgument, shown_url(url) + ": " + why);
}

}  // namespace

std::string shown_url(const std::string& url) {
  const size_t scheme = url.find("://");
  if (scheme == std::string::npos) return url;
  const size_t host = scheme + 3;
  const size_t path = url.find_first_of("/?#", host);
  const std::string authority = url.substr(host, path == std::string::npos ? std::string::npos : path - host);
  const size_t at = authority.rfind('@');
  std::string out = url.substr(0, host) + (at == std::string::npos ? authority : authority.substr(at + 1));
  if (path == std::string::npos) return out;
  const size_t query = url.find('?', path);
  out += url.substr(path, query == std::string::npos ? std::string::npos : query - path);
  if (query != std::string::npos) {
    const size_t fragment = url.find('#', query);
    const std::string q =
        url.substr(query + 1, fragment == std::string::npos ? std::string::npos : fragment - query - 1);
    out += '?';
    size_t start = 0;
    while (start <= q.size()) {
      const size_t amp = q.find('&', start);
      const std::string pair = q.substr(start, amp == std::string::npos ? std::string::npos : amp - start);
      const size_t eq = pair.find('=');
      out += (start ? "&" : "") + (eq == std::string::npos ? pair : pair.substr(0, eq) + "=...");
      if (amp == std::string::npos) break;
      start = amp + 1;
    }
  }
  return out;
}

RemoteTarget resolve_url(const std::string& url) {
  RemoteTarget t;
  t.url = url;
  t.shown = shown_url(url);
  if (url.rfind("s3://", 0) != 0) {
    if (!is_url(url)) refuse(url, "not an http://, https:// or s3:// URL");
    const size_t host = url.find("://") + 3;
    if (host >= url.size() || url[host] == '/') refuse(url, "a URL without a host");
    t.http_url = url;
    t.credentials = "no credentials";
    return t;
  }
  t.s3 = true;
  const std::string rest = url.substr(5);
  const size_t slash = rest.find('/');
  if (slash == std::string::npos || slash == 0 || slash + 1 == rest.size()) {
    refuse(url, "an S3 URL is s3://bucket/key, with a bucket and a key");
  }
  const std::string bucket = rest.substr(0, slash), key = rest.substr(slash + 1);
  for (const char c : bucket) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_')) {
      refuse(url, "the bucket name holds a character buckets cannot have");
    }
  }
  t.region = environment("AWS_REGION");
  if (t.region.empty()) t.region = environment("AWS_DEFAULT_REGION");
  if (t.region.empty()) t.region = "us-east-1";
  std::string endpoint = environment("AWS_ENDPOINT_URL_S3");
  if (endpoint.empty()) endpoint = environment("AWS_ENDPOINT_URL");
  if (!endpoint.empty()) {
    if (endpoint.rfind("http://", 0) != 0 && endpoint.rfind("https://", 0) != 0) {
      refuse(url, "the endpoint " + shown_url(endpoint) + " (AWS_ENDPOINT_URL) is not an http:// or https:// URL");
    }
    while (!endpoint.empty() && endpoint.back() == '/') endpoint.pop_back();
    t.http_url = endpoint + "/" + bucket + "/" + percent_encoded(key, true);
  } else if (bucket.find('.') != std::string::npos) {
    t.http_url = "https://s3." + t.region + ".amazonaws.com/" + bucket + "/" + percent_encoded(key, true);
  } else {
    t.http_url = "https://" + bucket + ".s3." + t.region + ".amazonaws.com/" + percent_encoded(key, true);
  }
  t.access_key = environment("AWS_ACCESS_KEY_ID");
  t.secret_key = environment("AWS_SECRET_ACCESS_KEY");
  if (!t.access_key.empty() && !t.secret_key.empty()) {
    t.session_token = environment("AWS_SESSION_TOKEN");
    t.credentials = "the AWS_ACCESS_KEY_ID of the environment";
  } else {
    t.access_key.clear();
    t.secret_key.clear();
    t.credentials = "no credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not both set): anonymous";
  }
  return t;
}

std::string sibling_url(const std::string& url, const std::string& name) {
  const size_t start = url.find("://") + 3;
  const size_t end = url.find_first_of("?#", start);
  const size_t slash = url.rfind('/', end == std::string::npos ? std::string::npos : end);
  const std::string folder = slash == std::string::npos || slash < start ? url + "/" : url.substr(0, slash + 1);
  return folder + (url.rfind("s3://", 0) == 0 ? name : percent_encoded(name, false));
}

}  // namespace detail
}  // namespace tensormap
