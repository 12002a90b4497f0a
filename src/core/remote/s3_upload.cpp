// S3Upload: see s3_upload.h.
#include "remote/s3_upload.h"

#include <algorithm>
#include <cstring>

#include "tensormap/error.h"
#include "tensormap/interrupt.h"

namespace tensormap::detail {
namespace {

constexpr uint64_t kLeastPart = uint64_t{5} << 20;  // S3's least part but the last
constexpr uint64_t kMostParts = 10'000;

}  // namespace

void put_object(const std::string& url, const std::string& bytes, const RemoteOptions& options) {
  const RemoteTarget target = resolve_url(url);
  if (!target.s3) throw Error(ErrorKind::InvalidArgument, target.shown + ": tensormap writes to s3:// URLs only");
  HttpSender sender;
  const HttpReply reply = sender.send(target, options, "PUT", "", bytes.data(), bytes.size(), "putting the object");
  if (reply.status != 200) {
    throw Error(status_kind(reply.status),
                target.shown + ": S3 refused the object (" + status_text(reply.status, reply.body) + ")");
  }
}

bool delete_object(const std::string& url, const RemoteOptions& options) noexcept {
  try {
    const RemoteTarget target = resolve_url(url);
    HttpSender sender;
    const long status = sender.send(target, options, "DELETE", "", nullptr, 0, "deleting the object").status;
    return status == 204 || status == 200;
  } catch (...) {
    return false;
  }
}

S3Upload::S3Upload(const std::string& url, RemoteOptions options)
    : target_(resolve_url(url)), options_(std::move(options)), part_bytes_(std::max(options_.part_bytes, kLeastPart)) {
  if (!target_.s3) {
    throw Error(ErrorKind::InvalidArgument,
                target_.shown + ": tensormap writes to s3:// URLs, not to http(s):// ones (no upload protocol there)");
  }
  const HttpReply reply = sender_.send(target_, options_, "POST", "uploads", nullptr, 0, "starting the upload");
  upload_id_ = xml_element(reply.body, "UploadId");
  if (reply.status != 200 || upload_id_.empty()) {
    throw Error(status_kind(reply.status),
                target_.shown + ": S3 refused to start the upload (" + status_text(reply.status, reply.body) +
                    (reply.status == 401 || reply.status == 403 ? "), asked with " + target_.credentials : ")"));
  }
}

S3Upload::~S3Upload() { discard(); }

void S3Upload::plan(uint64_t size, uint64_t written_last) {
  written_last_ = written_last;
  const uint64_t least = (size + kMostParts - 1) / kMostParts;  // S3's 10,000 parts at most
  if (least > part_bytes_) part_bytes_ = (least + (uint64_t{1} << 20) - 1) & ~((uint64_t{1} << 20) - 1);
}

void S3Upload::rethrow_failure() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (failure_) std::rethrow_exception(failure_);
}

void S3Upload::pwrite(const void* data, size_t size, uint64_t offset) {
  rethrow_failure();
  if (size == 0) return;
  const uint64_t end = offset + size;
  const uint64_t first = offset / part_bytes_, last = (end - 1) / part_bytes_;
  size_ = std::max(size_, end);
  upload_below(first);
  for (uint64_t part = first; part <= last; ++part) {
    if (part < next_ && !held(part)) {
      throw Error(ErrorKind::InvalidArgument,
                  target_.shown + ": a write at offset " + std::to_string(offset) +
                      " goes back to a part already uploaded; an upload to S3 takes its bytes in order");
    }
    auto& bytes = open_[part];
    if (bytes.empty()) bytes.assign(static_cast<size_t>(part_bytes_), 0);
    const uint64_t from = std::max(offset, part * part_bytes_), to = std::min(end, (part + 1) * part_bytes_);
    std::memcpy(bytes.data() + (from - part * part_bytes_), static_cast<const unsigned char*>(data) + (from - offset),
                static_cast<size_t>(to - from));
  }
  appended_ = std::max(appended_, end);
}

void S3Upload::truncate(uint64_t size) { size_ = size; }

// Queues every part below `part` not queued yet (but the held ones): the writer is past it.
void S3Upload::upload_below(uint64_t part) {
  for (; next_ < part; ++next_) {
    if (!held(next_)) queue(next_);
  }
}

void S3Upload::queue(uint64_t part) {
  std::vector<unsigned char> bytes;
  if (auto it = open_.find(part); it != open_.end()) {
    bytes = std::move(it->second);
    open_.erase(it);
  } else {
    bytes.assign(static_cast<size_t>(part_bytes_), 0);  // never written: padding, zeros
  }
  const uint64_t start = part * part_bytes_;
  bytes.resize(static_cast<size_t>(std::min(part_bytes_, size_ > start ? size_ - start : 0)));  // the last is short
  // The threads start with the first part and end with finish(): the shards of a sharded
  // save, each an upload, take their turns with one set of threads.
  if (threads_.empty()) {
    for (unsigned i = 0; i < options_.connections; ++i) threads_.emplace_back([this] { work(); });
  }
  std::unique_lock<std::mutex> lock(mutex_);
  while (waiting_.size() >= 2 * options_.connections && !failure_) {  // bounded memory: wait for a thread
    wait_interruptibly(lock, changed_, [&] { cancel_ = true; });
  }
  if (failure_) std::rethrow_exception(failure_);
  waiting_.emplace_back(part, std::move(bytes));
  changed_.notify_all();
}

void S3Upload::work() {
  HttpSender sender;
  while (true) {
    std::pair<uint64_t, std::vector<unsigned char>> job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      changed_.wait(lock, [&] { return stopping_ || !waiting_.empty(); });
      if (waiting_.empty()) return;
      job = std::move(waiting_.front());
      waiting_.pop_front();
      ++in_flight_;
      changed_.notify_all();
    }
    const uint64_t number = job.first + 1;
    std::exception_ptr error;
    std::string etag;
    try {
      const std::string what = "part " + std::to_string(number);
      const HttpReply reply =
          sender.send(target_, options_, "PUT",
                      "partNumber=" + std::to_string(number) + "&uploadId=" + percent_encoded(upload_id_, false),
                      job.second.data(), job.second.size(), "uploading " + what, &cancel_);
      if (reply.status != 200 || reply.etag.empty()) {
        throw Error(status_kind(reply.status),
                    target_.shown + ": S3 refused " + what + " (" + status_text(reply.status, reply.body) + ")");
      }
      etag = reply.etag;
    } catch (...) {
      error = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(mutex_);
    --in_flight_;
    if (error && !failure_) {
      failure_ = error;
      cancel_ = true;
    }
    if (!error) etags_[number] = etag;
    changed_.notify_all();
  }
}

void S3Upload::finish(bool) {
  rethrow_failure();
  const uint64_t parts = std::max<uint64_t>(1, (size_ + part_bytes_ - 1) / part_bytes_);
  upload_below(parts);
  for (uint64_t part = 0; part < parts; ++part) {
    if (held(part)) queue(part);
  }
  std::unique_lock<std::mutex> lock(mutex_);
  while (!(waiting_.empty() && in_flight_ == 0) && !failure_) {
    wait_interruptibly(lock, changed_, [&] { cancel_ = true; });
  }
  if (failure_) std::rethrow_exception(failure_);
  stopping_ = true;
  changed_.notify_all();
  lock.unlock();
  for (auto& t : threads_) t.join();
  threads_.clear();
  if (etags_.size() != parts) {
    throw Error(ErrorKind::RemoteProtocol, target_.shown + ": " + std::to_string(etags_.size()) + " of " +
                                               std::to_string(parts) + " parts uploaded");
  }
  finished_ = true;
}

void S3Upload::publish(bool) {
  if (!finished_) throw Error(ErrorKind::InvalidArgument, target_.shown + ": publish before finish");
  check_interrupt();  // the last moment a stop can still leave the old object
  std::string xml = "<CompleteMultipartUpload>";
  for (const auto& [number, etag] : etags_) {
    xml += "<Part><PartNumber>" + std::to_string(number) + "</PartNumber><ETag>" + etag + "</ETag></Part>";
  }
  xml += "</CompleteMultipartUpload>";
  const HttpReply reply = sender_.send(target_, options_, "POST", "uploadId=" + percent_encoded(upload_id_, false),
                                       xml.data(), xml.size(), "completing the upload");
  // S3 may answer 200 and still fail, with an error document for a body.
  if (reply.status != 200 || reply.body.find("<Error>") != std::string::npos) {
    throw Error(status_kind(reply.status == 200 ? 500 : reply.status),
                target_.shown + ": S3 refused to complete the upload (" + status_text(reply.status, reply.body) + ")");
  }
  published_ = true;
}

void S3Upload::discard() noexcept {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!published_) cancel_ = true;
    stopping_ = true;
    waiting_.clear();
  }
  changed_.notify_all();
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
  if (published_ || aborted_ || upload_id_.empty()) return;
  aborted_ = true;
  try {  // what is already uploaded is dropped; the old object stays as it was
    sender_.send(target_, options_, "DELETE", "uploadId=" + percent_encoded(upload_id_, false), nullptr, 0,
                 "aborting the upload");
  } catch (...) {}
}

}  // namespace tensormap::detail
