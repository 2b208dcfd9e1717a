#!/usr/bin/env bash
# Quick curl smoke test against a running server: health, one synthesis into test_output.wav, one error.
#   TTS_URL=http://localhost:8000 bash test_quick.sh
set -euo pipefail
url=${TTS_URL:-http://localhost:8000}
auth=()
[ -n "${API_KEY:-}" ] && auth=(-H "Authorization: Bearer $API_KEY")

echo "health:"
curl -fsS "$url/health" | head -c 300; echo

echo "synthesis -> test_output.wav:"
code=$(curl -sS -o test_output.wav -w '%{http_code}' "${auth[@]}" "$url/v1/audio/speech" \
  -H 'Content-Type: application/json' \
  -d '{"model": "tts-1", "input": "Hello from the quick test.", "voice": "alloy", "response_format": "wav"}')
[ "$code" = 200 ] || { echo "FAIL: HTTP $code: $(cat test_output.wav)"; exit 1; }
[ "$(head -c 4 test_output.wav)" = "RIFF" ] || { echo "FAIL: test_output.wav is not a WAV file"; exit 1; }
bytes=$(wc -c < test_output.wav)
[ "$bytes" -gt 10000 ] || { echo "FAIL: only $bytes bytes of audio"; exit 1; }
echo "  $bytes bytes"

echo "unknown voice -> 400:"
code=$(curl -sS -o /dev/null -w '%{http_code}' "${auth[@]}" "$url/v1/audio/speech" \
  -H 'Content-Type: application/json' -d '{"input": "hi", "voice": "nobody"}')
[ "$code" = 400 ] || { echo "FAIL: expected 400, got $code"; exit 1; }

echo "PASS"
