// Video results on mmfusion's page: a card shows the matched frame with its time range, and the panel plays the
// video from the matched segment's start (HTML5 <video>: seek once the metadata is in, then play). app.js calls
// these with the elements and helpers they need, so this module holds no state of its own.

function clock(t) {
  // seconds -> "mm:ss" (or "h:mm:ss"), to the nearest second as the CLI prints it
  const s = Math.round(t);
  const mm = String(Math.floor(s / 60) % 60).padStart(2, "0");
  const ss = String(s % 60).padStart(2, "0");
  return s >= 3600 ? `${Math.floor(s / 3600)}:${mm}:${ss}` : `${mm}:${ss}`;
}

function timeRange(r) {
  return `${clock(r.start)}–${clock(r.end)}`;
}

export function markVideoCard(li, thumb, open, r) {
  // the card of a video result: a time badge over the matched frame's thumbnail, and a label that says so
  li.classList.add("video");
  li.dataset.start = r.start;
  const badge = document.createElement("span");
  badge.className = "time-badge";
  badge.textContent = `▶ ${timeRange(r)}`;
  thumb.append(badge);
  const more = (r.metadata.segments || []).length - 1;
  const moments = more > 0 ? ` (and ${more} more moment${more === 1 ? "" : "s"})` : "";
  open.setAttribute("aria-label", `${r.name}, video from ${timeRange(r)}${moments}, score ${r.score.toFixed(3)}: play`);
}

export async function showVideo(r, ui) {
  // In the panel, a video result's <video> replaces the image and plays from the segment's start; an image
  // result hides the player. ui: {video, img, title, meta, link, auth, fetchBlob(url), keep(blobUrl), isCurrent()}
  const video = ui.video;
  if (!video) return;
  video.pause();
  const isVideo = r.media === "video";
  video.hidden = !isVideo;
  ui.img.hidden = isVideo;
  if (!isVideo) {
    video.removeAttribute("src");
    return;
  }
  ui.title.textContent = `${r.name} · ${timeRange(r)}`;
  ui.meta.textContent = `Video ${r.id} · plays from ${clock(r.start)} (segment ${timeRange(r)}) · score ${r.score.toFixed(3)}`;
  const relative = r.video_url.replace(/^\//, "");
  ui.link.href = relative;
  let src = relative;
  if (ui.auth) {
    // a <video src> cannot send the key: fetch the file and play a blob URL (which seeks without Range)
    try {
      src = URL.createObjectURL(await ui.fetchBlob(r.video_url));
      ui.keep(src);
    } catch (e) {
      ui.meta.textContent = `Video ${r.id} (not loaded: ${e.message})`;
      return;
    }
  }
  if (!ui.isCurrent()) return; // another result was opened meanwhile
  video.addEventListener(
    "loadedmetadata",
    () => {
      video.currentTime = r.start;
      video.play().catch(() => {}); // autoplay may be refused: the controls remain
    },
    { once: true },
  );
  video.src = src;
}
