// An image shown large, with previous/next through the queue's succeeded images.

import { $ } from "./dom.js";

let current = null; // { q, index, returnFocus }

function lightboxImages(q) {
  return [...q.images.values()].filter((img) => img.status === "succeeded" && img.url).sort((a, b) => a.index - b.index);
}

export function openLightbox(q, index, returnFocus) {
  current = { q, index, returnFocus };
  showLightbox();
  $("lightbox").hidden = false;
  document.body.classList.add("no-scroll");
  $("lightbox-close").focus();
}

function showLightbox() {
  const { q, index } = current;
  const img = q.images.get(index);
  if (!img) return;
  $("lightbox-img").src = img.url;
  $("lightbox-img").alt = img.prompt || `image ${index}`;
  $("lightbox-open").href = img.url;
  const parts = [`#${index}`];
  if (img.seed !== null && img.seed !== undefined) parts.push(`seed ${img.seed}`);
  $("lightbox-caption").textContent = `${parts.join(" · ")}${img.prompt ? ` — ${img.prompt}` : ""}`;
  const many = lightboxImages(q).length > 1;
  $("lightbox-prev").hidden = !many;
  $("lightbox-next").hidden = !many;
}

function stepLightbox(delta) {
  if (!current) return;
  const list = lightboxImages(current.q);
  if (!list.length) return;
  const at = list.findIndex((img) => img.index === current.index);
  const next = list[(at + delta + list.length) % list.length];
  current.index = next.index;
  showLightbox();
}

function closeLightbox() {
  if (!current) return;
  const back = current.returnFocus;
  current = null;
  $("lightbox").hidden = true;
  $("lightbox-img").removeAttribute("src");
  document.body.classList.remove("no-scroll");
  if (back && back.isConnected) back.focus();
}

export function bindLightbox() {
  $("lightbox-img").addEventListener("load", (event) => {
    const img = event.target;
    if (img.naturalWidth && img.naturalHeight) img.style.setProperty("--ratio", String(img.naturalWidth / img.naturalHeight));
  });
  $("lightbox-close").addEventListener("click", closeLightbox);
  $("lightbox-prev").addEventListener("click", () => stepLightbox(-1));
  $("lightbox-next").addEventListener("click", () => stepLightbox(1));
  $("lightbox").addEventListener("click", (event) => {
    if (event.target === $("lightbox") || event.target.tagName === "FIGURE") closeLightbox();
  });
  document.addEventListener("keydown", (event) => {
    if (!current) return;
    if (event.key === "Escape") closeLightbox();
    else if (event.key === "ArrowLeft") stepLightbox(-1);
    else if (event.key === "ArrowRight") stepLightbox(1);
  });
}
