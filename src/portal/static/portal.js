// imapgate portal: the copy button. Pages work without this script.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", async () => {
      const source = document.getElementById(button.dataset.copy);
      const status = document.getElementById("copy-status");
      if (!source) return;
      try {
        await navigator.clipboard.writeText(source.textContent.replace(/\s+/g, ""));
        if (status) status.textContent = button.dataset.copied || "";
      } catch (e) {
        // No clipboard (an insecure context or a refused permission): select the text instead.
        const range = document.createRange();
        range.selectNodeContents(source);
        const sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
      }
    });
  }
});

// Pending sign-ins: refreshed every few seconds while the page is visible (no reload).
document.addEventListener("DOMContentLoaded", () => {
  const box = document.getElementById("approvals");
  if (!box || !box.dataset.refresh) return;
  const refresh = async () => {
    if (document.visibilityState !== "visible") return;
    // Never replace the list under a keyboard user's focus.
    if (box.contains(document.activeElement) && document.activeElement !== document.body) return;
    try {
      const r = await fetch(box.dataset.refresh, { credentials: "same-origin", cache: "no-store" });
      if (!r.ok) return;
      const html = await r.text();
      if (html.trim() !== box.innerHTML.trim()) box.innerHTML = html;
    } catch (e) {
      // Offline for a moment: the next round tries again.
    }
  };
  setInterval(refresh, 5000);
});
