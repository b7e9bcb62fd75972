"""The web studio's page: index.html, studio.js and studio.css, served by polyphony.serve."""
