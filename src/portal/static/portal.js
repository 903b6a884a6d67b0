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
